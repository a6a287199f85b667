"""``Session``: one conversation over an engine: voices, turns, budget, pruning, ``$CLEAR$``, history.

Speaking a line: ``$CLEAR$`` clears; otherwise the line is split into parts (``name: text``,
``a || b``), each part is normalized and segmented (companion.text), and each segment is generated
in order: when the prompt does not fit, plan to prune the oldest turns with slack
(``context.prune_to``), stream the audio with the planned context, then keep the segment: first in the
history database (one transaction: the turn and where the context now starts), then in memory (the
prune applied, the turn appended). Nothing changes before that: a cancelled, failed or abandoned
segment (even one finalised later, after a ``$CLEAR$``) leaves memory and history as they were, and a
segment that finishes after the conversation changed under it is not kept.

A voice without reference audio gets one: its first segment is generated with no context and a fixed
seed, pinned as its reference, and saved with its profile (WAV + transcript, and the exact codes in
the reference cache) so later turns and later sessions keep that voice.

``resume_session`` (companion.session.resume) rebuilds a recorded session from the history.

Not thread-safe: drive a session from one thread (cancel it from another with the Event). Sessions
on other threads may share the engine (up to its ``max_batch`` streams), the store, the voice store
and the reference cache (whose ``making()`` lock keeps a voice's reference made and saved once).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import numpy as np
import torch

from companion.config import Settings
from companion.engine import Engine, GenerationOptions, Segment
from companion.errors import CompanionError
from companion.session.audio import AudioLog, TurnStats, output_marker
from companion.session.context import MIN_TEXT_POSITIONS, Context, ContextRow, TextTooLong, Turn, Voice
from companion.session.dialogue import Dialogue, Exchange
from companion.session.script import assign_voices, is_clear, parse_line
from companion.store import Store, TurnRecord, VoiceRecord
from companion.text import NOTHING_TO_SAY, NothingToSay, prepare
from companion.voices import DEFAULT_VOICE

STATS_KEPT = 200


class Session:
    def __init__(self, engine: Engine, settings: Settings, store: Store | None = None,
                 voices: Any = None, cache: Any = None) -> None:
        self.engine = engine
        self.settings = settings
        self.store = store
        self.voice_store = voices  # companion.voices.VoiceStore, or None (voices added with add_voice only)
        self._cache = cache
        self.context = Context(engine.max_seq_len, engine.segment_positions, engine.frame_rate,
                               settings.context.prune_to)
        self.active: str | None = None
        self.session_id: int | None = None
        self.overrides: dict[str, Any] = {}  # temperature/topk/seed set during the session (win over all)
        self.stats: deque[TurnStats] = deque(maxlen=STATS_KEPT)
        self.log = AudioLog(engine.sample_rate)
        self._reply: list[np.ndarray] = []
        self.reply_voices: list[str] = []  # the voices of the last ``speak``, in order
        self._next_seq = 1
        self.dialogue = Dialogue()  # the text exchanged with an LLM (talking back), bounded
        self._next_exchange = 1
        # Called when a segment is generated, before it is kept; False drops it as if cancelled (a server
        # keeps only segments whose audio its client was sent). None: every finished segment is kept.
        self.delivered: Callable[[], bool] | None = None

    # ---- voices ---------------------------------------------------------------------------------

    @property
    def voice(self) -> Voice | None:
        """The active voice."""
        return self.context.voices.get(self.active) if self.active else None

    @property
    def cache(self) -> Any:
        if self._cache is None:
            from companion.refcache import ReferenceCache

            self._cache = ReferenceCache()
        return self._cache

    def use_voice(self, name: str) -> Voice:
        """Make ``name`` the active voice (loading its reference first if it is new to the session)."""
        voice = self._voice(name)
        self.active = voice.name
        if self.store is not None and self.session_id is not None:
            self.store.set_state(self.session_id, voice=voice.name)
        return voice

    def add_voice(self, voice: Voice) -> Voice:
        """Add a voice (its reference pinned; refused when it cannot fit). The first one becomes active."""
        taken = {v.speaker for v in self.context.voices.values() if v.name != voice.name}
        while voice.speaker in taken:  # every voice in a session needs its own speaker id
            voice.speaker += 1
        evicted = self.context.plan_pin(voice, self.max_frames())
        if self.store is not None and self.session_id is not None:  # history first, then memory
            self.store.put_voice(self.session_id, voice_record(voice), unpinned=evicted)
        self.context.pin(voice, self.max_frames())
        if self.active in evicted:
            self.active = voice.name
        self.active = self.active or voice.name
        return voice

    def _voice(self, name: str) -> Voice:
        if name in self.context.voices:
            return self.context.voices[name]
        return self.add_voice(self._load_voice(name))

    def _load_voice(self, name: str) -> Voice:
        from companion.voices import VoiceProfile, load_voice

        if self.voice_store is None:
            raise CompanionError(f"unknown voice '{name}': this session has no voice store to load it from")
        try:
            profile = self.voice_store.get(name)
        except CompanionError:
            if name != DEFAULT_VOICE:
                raise
            profile = VoiceProfile(name=DEFAULT_VOICE, speaker=0)  # saved once it has a reference
        prepared = load_voice(profile, self.engine, self.settings.reference, self.cache)
        return Voice(prepared.name, prepared.speaker, prepared.transcript, prepared.codes,
                     generation=dict(prepared.generation), profile=profile)

    def known_voices(self) -> list[str]:
        names = list(self.context.voices)
        if self.voice_store is not None:
            names += [n for n in self.voice_store.names() if n not in names]
        return names

    # ---- options and budget ---------------------------------------------------------------------

    def max_frames(self) -> int:
        """Frames reserved for (and generated at most by) one segment."""
        return max(1, int(self.settings.generation.max_segment_seconds * self.engine.frame_rate))

    def options(self, voice: Voice) -> GenerationOptions:
        """Config, then the voice profile's settings, then the session's overrides."""
        g = self.settings.generation
        values: dict[str, Any] = {"temperature": g.temperature, "topk": g.topk, "seed": g.seed}
        values |= {k: v for k, v in voice.generation.items() if k in values}
        values |= {k: v for k, v in self.overrides.items() if k in values}
        return GenerationOptions(max_frames=self.max_frames(), **values)

    def context_used(self) -> int:
        """Positions the next prompt holds before its text (turns that no longer fit not counted)."""
        return self.context.in_memory(self.max_frames())

    def context_budget(self) -> int:
        """Positions available to references + turns + the next text."""
        return self.engine.max_seq_len - self.max_frames()

    def context_report(self) -> list[ContextRow]:
        return self.context.report(self.max_frames())

    # ---- speaking -------------------------------------------------------------------------------

    def speak(self, text: str, voice: str | None = None, cancel: threading.Event | None = None) -> Iterator[np.ndarray]:
        """Speak one line; returns an iterator of 24 kHz float32 audio chunks, in order.

        ``$CLEAR$`` clears at once (and returns an empty iterator). Voice names and parts are checked
        now, so an unknown voice raises here; the audio is generated while the iterator is consumed.
        """
        if is_clear(text):
            self.clear()
            return iter(())
        default = voice or self.active or self.settings.voice or DEFAULT_VOICE
        parts = parse_line(text, self.known_voices())
        if not any(prepare(p.text) for p in parts):  # before any voice is loaded or any model work
            raise NothingToSay(NOTHING_TO_SAY)
        order = list(self.context.voices) or [default]
        voiced = [(self._voice(name), part) for name, part in assign_voices(parts, order, default)]
        if self.active is None and voiced:
            self.active = voiced[0][0].name
        return self._speak_parts(voiced, cancel)

    def _speak_parts(self, parts: list[tuple[Voice, str]], cancel: threading.Event | None) -> Iterator[np.ndarray]:
        self._reply, self.reply_voices = [], []
        for voice, text in parts:
            if voice.name not in self.reply_voices:
                self.reply_voices.append(voice.name)
            for seg_text in prepare(text, self.settings.generation.max_segment_seconds):
                for piece in self._fit_text(voice, seg_text):
                    if cancel is not None and cancel.is_set():
                        return
                    yield from self._speak_segment(voice, piece, cancel, typed=text)

    def _fit_text(self, voice: Voice, text: str) -> list[str]:
        """``text``, or its halves (recursively, between words) when references + text + reply cannot fit."""
        room = self.context.max_seq_len - self.max_frames() - self.context.reference_positions()
        if voice.codes is None:
            room -= MIN_TEXT_POSITIONS  # the reference this segment becomes needs room too
        if self.engine.text_positions(voice.speaker, text) <= room:
            return [text]
        words = text.split()
        if len(words) < 2:
            raise TextTooLong(self.engine.text_positions(voice.speaker, text) + self.max_frames(), room + self.max_frames())
        half = len(words) // 2
        return self._fit_text(voice, " ".join(words[:half])) + self._fit_text(voice, " ".join(words[half:]))

    def _speak_segment(self, voice: Voice, text: str, cancel: threading.Event | None,
                       typed: str | None = None) -> Iterator[np.ndarray]:
        opts = self.options(voice)
        bootstrap = voice.codes is None
        version = self.context.version  # the conversation this segment is spoken after
        dropped: list[Turn] = []
        if bootstrap:  # no context: the voice must not depend on what was said before
            opts = dataclasses.replace(opts, seed=self._bootstrap_seed(voice, opts), max_frames=self._bootstrap_frames(voice, text))
            context: list[Segment] = []
        else:  # planned only: the prune is applied when the segment is kept
            dropped = self.context.plan_fit(opts.max_frames, self.engine.text_positions(voice.speaker, text))
            context = self.context.segments(skip=len(dropped))
        marker = output_marker(self.settings)
        start, first_ms = time.perf_counter(), None
        codes: list[torch.Tensor] = []
        heard: list[np.ndarray] = []
        completed = False
        try:
            with closing(self.engine.stream(context, voice.speaker, text, opts, cancel)) as stream:
                for chunk in stream:
                    codes.append(chunk.codes)
                    audio = marker(chunk.audio) if marker is not None else chunk.audio
                    first_ms = first_ms if first_ms is not None else (time.perf_counter() - start) * 1000
                    heard.append(audio)
                    self._reply.append(audio)
                    yield audio
            completed = cancel is None or not cancel.is_set()
            if completed and self.delivered is not None:
                completed = self.delivered()
        finally:
            stats = self._stats(voice, text, codes, start, first_ms, len(dropped), not completed, bootstrap)
        if not completed or stats.frames == 0 or self.context.version != version:
            return  # cancelled, the model ended at once, or the conversation changed meanwhile: not kept
        all_codes = torch.cat(codes, dim=1)
        if bootstrap:
            self._adopt_reference(voice, text, all_codes, np.concatenate(heard), stats, typed)
        else:
            self._keep_turn(voice, text, all_codes, stats, typed, dropped)
        self.log.append(np.concatenate(heard))

    def _stats(self, voice: Voice, text: str, codes: list[torch.Tensor], start: float, first_ms: float | None,
               dropped: int, cancelled: bool, bootstrap: bool) -> TurnStats:
        frames = sum(int(c.shape[-1]) for c in codes)
        seconds = frames / self.engine.frame_rate
        wall = time.perf_counter() - start
        es = self.engine.last_stats
        stats = TurnStats(voice.name, text, frames, seconds, first_ms, wall / seconds if seconds else None,
                          es.prompt_positions, es.prefill_positions, dropped, cancelled, bootstrap)
        self.stats.append(stats)
        return stats

    def _bootstrap_seed(self, voice: Voice, opts: GenerationOptions) -> int:
        """A configured seed, or one fixed by the voice's name (so each new voice has its own)."""
        return opts.seed if opts.seed is not None else zlib.crc32(voice.name.encode())

    def _bootstrap_frames(self, voice: Voice, text: str) -> int:
        """At most a segment's frames, and no more than a reference can take beside the reply."""
        others = self.context.reference_positions()
        room = (self.context.max_seq_len - self.max_frames() - MIN_TEXT_POSITIONS - others
                - self.engine.text_positions(voice.speaker, text) - 1)
        if room < 1:
            raise CompanionError(
                f"voice '{voice.name}' has no reference and the context ({self.context.max_seq_len} positions) "
                "has no room to make one: raise context.max_seq_len or lower generation.max_segment_seconds"
            )
        return min(self.max_frames(), room)

    def _keep_turn(self, voice: Voice, text: str, codes: torch.Tensor, stats: TurnStats, typed: str | None,
                   dropped: list[Turn]) -> None:
        """Keep a spoken segment: stored first (with where the context starts once ``dropped`` are gone),
        then in memory (``dropped`` dropped, the turn appended)."""
        seq = self._next_seq
        if self.store is not None:
            record = TurnRecord(voice.name, voice.speaker, text, codes, first_audio_ms=stats.first_audio_ms, rtf=stats.rtf,
                                typed=typed)
            seq = self.store.add_turn(self._session_id(), record, self.context.first_seq(skip=len(dropped)))
        seg = Segment(voice.speaker, text, codes)
        self.context.drop(dropped)
        self.context.append(Turn(seq, voice.name, voice.speaker, text, codes, self.engine.segment_positions(seg)))
        self._next_seq = seq + 1

    def _adopt_reference(self, voice: Voice, text: str, codes: torch.Tensor, audio: np.ndarray, stats: TurnStats,
                         typed: str | None = None) -> None:
        """Pin a bootstrap segment as the voice's reference: recorded first, then in memory; then saved
        with the profile."""
        adopted = dataclasses.replace(voice, codes=codes, transcript=text)
        evicted = self.context.plan_pin(adopted, self.max_frames())
        seq = self._next_seq
        if self.store is not None:
            record = TurnRecord(voice.name, voice.speaker, text, codes, kind="reference",
                                first_audio_ms=stats.first_audio_ms, rtf=stats.rtf, typed=typed)
            seq = self.store.add_turn(self._session_id(), record, self.context.first_seq(), voice=voice_record(adopted),
                                      unpinned=evicted)
        voice.codes, voice.transcript = codes, text
        self.context.pin(voice, self.max_frames())
        if self.active in evicted:
            self.active = voice.name
        self._next_seq = seq + 1
        if self.voice_store is not None and voice.profile is not None:
            self._save_reference(voice, text, codes, audio)

    def _save_reference(self, voice: Voice, text: str, codes: torch.Tensor, audio: np.ndarray) -> None:
        """Write the reference WAV + transcript into the profile, and its exact codes into the cache
        under the key the next ``load_voice`` computes, so the next session pins the same codes."""
        with self.cache.making():  # another session may make this voice's reference at the same time
            profile = self.voice_store.attach_reference(voice.profile, audio, text)
            key = self.cache.key(profile.audio_paths(), self.settings.reference, self.engine.model_key,
                                 self.engine.codec_key)
            self.cache.put(key, codes, {"voice": voice.name, "model": self.engine.model_key, "source": "generated"})
        voice.profile = profile

    def _session_id(self) -> int:
        assert self.store is not None
        if self.session_id is None:
            self.session_id = self.store.create_session(
                self.engine.model_key, self.engine.max_seq_len, [voice_record(v) for v in self.context.voices.values()],
                self.active,
            )
        return self.session_id

    # ---- memory ---------------------------------------------------------------------------------

    def clear(self) -> None:
        """``$CLEAR$``: forget the conversation (audio context and text exchanges), keep the voices."""
        if self.store is not None and self.session_id is not None:
            self.store.set_state(self.session_id, context_start=self._next_seq, exchanges_start=self._next_exchange)
        self.context.clear()
        self.dialogue.clear()

    def new_exchange(self, user: str) -> Exchange:
        """A numbered, empty exchange for the reply about to be spoken (kept once ``record`` is called)."""
        exchange = Exchange(user, "", partial=True, seq=self._next_exchange)
        self._next_exchange += 1
        return exchange

    def record(self, exchange: Exchange) -> None:
        """Keep ``exchange`` (stored first, then remembered); called again as its reply grows."""
        if self.store is not None:
            self.store.put_exchange(self._session_id(), exchange)
        self.dialogue.put(exchange)

    def context_segments(self) -> list[Segment]:
        """The context the next prompt starts with (references, then the turns kept)."""
        return self.context.segments()

    def last_reply_audio(self) -> np.ndarray:
        """(n,) float32: everything the last ``speak`` produced (as heard, watermark included)."""
        return np.concatenate(self._reply) if self._reply else np.zeros(0, dtype=np.float32)

    def conversation_audio(self) -> np.ndarray:
        """(n,) float32: every completed utterance of this session, with short gaps between them."""
        return self.log.read()

    def close(self) -> None:
        self.log.close()

    # ---- persistence ----------------------------------------------------------------------------


def voice_record(voice: Voice) -> VoiceRecord:
    """What the history keeps of a voice in a session."""
    return VoiceRecord(voice.name, voice.speaker, voice.transcript, voice.codes)

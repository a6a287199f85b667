"""`companion batch`'s rendering: each script's lines in order, in its own conversation; several
scripts at once.

    main thread: one progress bar over the lines of every script; Ctrl-C sets ``stop``
        |
    script threads (at most engine.max_batch; the other scripts wait for a free one): for each script,
    a Session over a Takes recorder over the shared engine, line after line:
        speak -> NNN-VOICE.wav -> its take -> manifest.json (atomically) -> the bar advances

The promise: a script's folder and manifest are written only by its own thread, in line order, each
line's files before the manifest claims them, so a script that fails or is stopped leaves a folder
that the same command resumes, and never touches another script's. After a failure the other
scripts go on; after Ctrl-C every script stops within a frame, keeping the lines it finished. One
script runs on the main thread, exactly as batch always did (its Ctrl-C is the KeyboardInterrupt).
"""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from companion.errors import CompanionError
from companion.session.manifest import CONVERSATION, MANIFEST, TAKES, LineEntry, Manifest

if TYPE_CHECKING:
    from collections.abc import Callable

    from companion.config import Settings
    from companion.engine import Engine
    from companion.session import Session
    from companion.session.replay import Take, Takes
    from companion.store import Store
    from companion.voices import VoiceStore


class Stopped(Exception):
    """Ctrl-C reached a script rendered on another thread: it stops before its next line is claimed."""


@dataclass
class ScriptWork:
    """One script to render into ``folder``: its manifest (written), the lines kept from an earlier run
    and their takes, and the history entry this run replaces."""

    script: Path
    folder: Path
    manifest: Manifest
    kept: int
    takes: list[list[Take]]
    replaces: int | None
    seconds: float = 0.0  # conversation.wav's, once written
    history: int | None = None
    error: str | None = None  # one line, when its rendering failed

    @property
    def todo(self) -> int:
        return sum(1 for e in self.manifest.lines[self.kept:] if not e.clear)

    def counts(self) -> tuple[int, int]:
        """(lines rendered, lines to speak) in its manifest."""
        lines = [e for e in self.manifest.lines if not e.clear]
        return sum(1 for e in lines if e.done), len(lines)


def render(engine: Engine, settings: Settings, voices: VoiceStore, works: list[ScriptWork],
           args: argparse.Namespace) -> int:
    """Render ``works`` (one on this thread; several on up to ``engine.max_batch`` threads) under one bar."""
    from rich.console import Console

    from companion.commands.progress import work_bar
    from companion.store import Store

    store = None if args.no_history else Store()
    console = Console(file=sys.stderr)
    for work in works:
        if work.kept:
            console.print(f"skipped {work.kept} lines already rendered in {work.folder} "
                          "(their recorded takes are replayed)")
    total = sum(w.todo for w in works)
    stop = threading.Event()
    try:
        with work_bar("rendering" if len(works) == 1 else f"rendering {len(works)} scripts", total, console) as advance:
            if len(works) == 1:
                _render_script(engine, settings, voices, store, works[0], advance, None)
            else:
                _render_together(engine, settings, voices, store, works, advance, stop)
    except KeyboardInterrupt:
        stop.set()
        done, lines = (sum(n) for n in zip(*(w.counts() for w in works), strict=True))
        says = f"{works[0].folder / MANIFEST} says which" if len(works) == 1 else "each script's manifest.json says which"
        print(f"interrupted: {done} of {lines} lines are rendered ({says}); "
              "run the same command again to render the rest", file=sys.stderr)
        return 130
    finally:
        if store is not None:
            store.close()
    failed = [w for w in works if w.error is not None]
    for work in works:
        if work.error is None:
            where = f"; history conversation {work.history}" if work.history is not None else ""
            skipped = f" (skipped {work.kept} already rendered)" if work.kept else ""
            print(f"wrote {work.todo} lines{skipped} and {CONVERSATION} ({work.seconds:.1f} s) to {work.folder}{where}")
    for work in failed:
        done, lines = work.counts()
        print(f"error: {work.script}: {work.error} ({done} of its {lines} lines are rendered in {work.folder}; "
              "the same command renders the rest)", file=sys.stderr)
    return 1 if failed else 0


def _render_together(engine: Engine, settings: Settings, voices: VoiceStore, store: Store | None,
                     works: list[ScriptWork], advance: Callable[[], None], stop: threading.Event) -> None:
    """Each script on a thread of its own, at most ``engine.max_batch`` at once; a failure is the
    script's own (``work.error``); Ctrl-C here stops them all."""
    from companion.oserrors import describe

    def one(work: ScriptWork) -> None:
        try:
            _render_script(engine, settings, voices, store, work, advance, stop)
        except Stopped:
            pass
        except CompanionError as err:
            work.error = str(err)
        except OSError as err:
            work.error = describe(err)
        except Exception as err:  # noqa: BLE001 - one script's failure; the others go on
            work.error = f"unexpected {type(err).__name__}: {err} (please report it)"

    pool = ThreadPoolExecutor(max_workers=max(1, min(len(works), engine.max_batch)), thread_name_prefix="companion-script")
    futures: list[Future[None]] = []
    try:
        futures = [pool.submit(one, work) for work in works]
        pending = set(futures)
        while pending:  # short waits: Ctrl-C reaches this thread between them
            _, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
    except KeyboardInterrupt:
        stop.set()
        for future in futures:
            future.cancel()  # scripts not started yet stay as they are (resumable)
        pool.shutdown(wait=True)
        raise
    pool.shutdown(wait=True)


def _render_script(engine: Engine, settings: Settings, voices: VoiceStore, store: Store | None, work: ScriptWork,
                   advance: Callable[[], None], stop: threading.Event | None) -> None:
    """Render one script into its folder, line after line, with its own session and conversation."""
    from companion.session import Session
    from companion.session.replay import Takes

    if stop is not None and stop.is_set():
        raise Stopped()
    manifest, folder, replaces = work.manifest, work.folder, work.replaces
    recorder = Takes(engine)
    session = Session(cast("Engine", recorder), settings, store, voices)
    try:
        if settings.voice:
            session.use_voice(settings.voice)  # an unknown voice fails before any work
        number = 0
        for i, entry in enumerate(manifest.lines):
            if entry.clear:
                session.clear()
                entry.done = True
                continue
            number += 1
            if i < work.kept:
                recorder.replay(work.takes[i])
                list(session.speak(entry.text))
            else:
                _render_line(session, recorder, entry, folder, number, stop)
            if store is not None and session.session_id is not None and manifest.history != session.session_id:
                manifest.history = session.session_id
                if replaces is not None:  # the new entry holds every line the old one had, from the first on
                    store.delete_session(replaces)
                    replaces = None
            if i >= work.kept:
                manifest.write(folder)  # after the line's files: the manifest never claims a missing file
                advance()
        _write(folder / CONVERSATION, session.conversation_audio(), engine.sample_rate)
        manifest.complete = True
        manifest.write(folder)
        work.seconds, work.history = session.log.seconds, session.session_id
    finally:
        session.close()


def _render_line(session: Session, recorder: Takes, entry: LineEntry, directory: Path, number: int,
                 stop: threading.Event | None) -> None:
    """Speak one script line; write its audio as NNN-VOICE.wav and its take; fill in its entry."""
    from companion.session.manifest import write_take

    recorder.recorded = []
    chunks = list(session.speak(entry.text, cancel=stop))
    if stop is not None and stop.is_set():
        raise Stopped()  # the line may be cut: neither written nor claimed
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    voice = "+".join(session.reply_voices) or "none"
    name = f"{number:03d}-{voice}.wav"
    _write(directory / name, audio, session.engine.sample_rate)
    take = f"{TAKES}/{number:03d}.safetensors"
    write_take(directory / take, recorder.recorded)
    first = session.context.voices.get(session.reply_voices[0]) if session.reply_voices else None
    entry.done, entry.file, entry.voice, entry.take = True, name, voice, take
    entry.seconds = round(len(audio) / session.engine.sample_rate, 3)
    entry.seed = session.options(first).seed if first is not None else session.settings.generation.seed


def _write(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    from companion.audio.io import write_wav

    write_wav(path, audio, sample_rate)


def check_names(scripts: list[Path]) -> None:
    """Several scripts go to folders named for them: two with the same name (in any case) cannot."""
    seen: dict[str, Path] = {}
    for script in scripts:
        key = script.stem.casefold()
        if key in seen and seen[key].absolute() == script.absolute():
            raise CompanionError(f"{script} is given twice: give each script once")
        if key in seen:
            raise CompanionError(f"{seen[key]} and {script} would both be rendered into the folder '{script.stem}': "
                                 "rename one of them (each script's folder is named after its file)")
        seen[key] = script


"""Scoring a saved conversation turn by turn (companion.eval.conversation), on real speech and the real
speaker encoder. The stored codes stand for real recordings: ``decode`` looks each one up."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from companion.eval.clips import clip_from_samples
from companion.eval.conversation import Reference, drift, references, score_turns
from companion.eval.encoder import embed
from companion.store import TurnRecord

RATE = 24000


def recordings(speech_24k: Callable[[str, float], np.ndarray]) -> tuple[dict[int, np.ndarray], Callable]:
    """Turn audio by its codes' first value: 1-3 the guest's voice, 4 the narrator's, 5 too short to measure."""
    guest = speech_24k("guest.mp3", 9.0)
    audio = {1: guest[: 3 * RATE], 2: guest[3 * RATE : 6 * RATE], 3: guest[6 * RATE :],
             4: speech_24k("narrator.mp3", 3.0), 5: guest[: RATE // 5]}

    def decode(codes: torch.Tensor) -> np.ndarray:
        return audio[int(codes[0, 0])]

    return audio, decode


def codes(key: int) -> torch.Tensor:
    return torch.full((32, 4), key, dtype=torch.long)


def test_a_voices_own_bootstrapped_reference_is_not_scored(speech_24k) -> None:
    """The voice's first reply was kept as its reference: scoring it would compare it with itself (or, with
    a profile's recording, count the same reply twice). It is listed, unmeasured, and left out of the drift."""
    audio, decode = recordings(speech_24k)
    clip = clip_from_samples("guest", audio[1], RATE)
    refs = {"guest": Reference("guest", "the reference stored with the conversation", embed(clip), clip.band_limited)}
    turns = [TurnRecord("guest", 0, "Hello.", codes(1), kind="reference", seq=1),
             TurnRecord("guest", 0, "How are you?", codes(2), seq=2),
             TurnRecord("guest", 0, "Fine.", codes(3), seq=3),
             TurnRecord("guest", 0, "Hm.", codes(5), seq=4)]
    rows = score_turns(turns, refs, decode, RATE)
    assert [r.seq for r in rows] == [1, 2, 3, 4]
    assert rows[0].score is None and rows[0].problem == "the voice's first reply, kept as its reference"
    assert rows[0].seconds == 3.0  # still listed with its length
    assert rows[1].score is not None and rows[2].score is not None and rows[1].problem is None
    assert rows[3].score is None and rows[3].problem is not None  # too short: says why
    (guest,) = drift(rows, refs)
    assert guest.turns == [2, 3] and guest.scores == [rows[1].score.similarity, rows[2].score.similarity]
    assert guest.as_dict()["turns_measured"] == 2


def test_each_turn_is_scored_against_its_own_voice(speech_24k) -> None:
    """Two voices: the narrator's turn measured against the guest's reference would score low; against its
    own, high. Drift is per voice, in the order the voices first speak."""
    audio, decode = recordings(speech_24k)
    guest_clip = clip_from_samples("guest", audio[1], RATE)
    narrator_clip = clip_from_samples("narrator", speech_24k("narrator.mp3", 6.0)[3 * RATE :], RATE)
    refs = {"guest": Reference("guest", "g", embed(guest_clip), guest_clip.band_limited),
            "narrator": Reference("narrator", "n", embed(narrator_clip), narrator_clip.band_limited)}
    turns = [TurnRecord("narrator", 1, "Welcome.", codes(4), seq=1),
             TurnRecord("guest", 0, "Thanks.", codes(2), seq=2)]
    rows = score_turns(turns, refs, decode, RATE)
    assert rows[0].score is not None and rows[1].score is not None
    crossed = score_turns([TurnRecord("guest", 0, "Welcome.", codes(4), seq=1)], refs, decode, RATE)[0]
    assert crossed.score is not None and crossed.score.similarity < rows[0].score.similarity
    assert [(d.voice, d.reference, d.turns) for d in drift(rows, refs)] == [("narrator", "n", [1]), ("guest", "g", [2])]


def test_each_voices_reference_comes_from_its_profile_else_the_stored_one_else_none(speech_24k, data_dir) -> None:
    """The profile's recording wins over the reference the conversation stored; with neither the voice is
    listed with the problem; a stored reference too short to measure says so."""
    from companion.store import VoiceRecord
    from companion.voices import VoiceProfile, VoiceStore

    audio, decode = recordings(speech_24k)
    profiles = VoiceStore()
    profiles.add(VoiceProfile(name="guest", audio=[str(data_dir / "guest.mp3")], transcript_file=str(data_dir / "guest.txt")))
    stored = [VoiceRecord("guest", 0, "t", codes(2)), VoiceRecord("host", 1, "t", codes(4)),
              VoiceRecord("short", 2, "t", codes(5)), VoiceRecord("bare", 3, None, None)]
    refs = references(["guest", "host", "short", "bare", "unknown"], stored, decode, RATE, profiles=profiles)
    assert list(refs) == ["guest", "host", "short", "bare", "unknown"]
    guest = refs["guest"]
    assert guest.source == str(profiles.get("guest").audio_paths()[0]) and guest.embedding is not None
    assert guest.problem is None
    narrator = refs["host"]  # (no profile: the conversation's own)
    assert narrator.source == "the reference stored with the conversation" and narrator.embedding is not None
    own = embed(clip_from_samples("n", audio[4], RATE))
    assert float(np.dot(narrator.embedding.vector, own.vector)) > 0.99  # the stored codes, decoded
    short = refs["short"]
    assert short.embedding is None and short.problem is not None
    assert short.problem.startswith("reference the reference stored with the conversation: ")
    for name in ("bare", "unknown"):
        assert refs[name] == Reference(name, "none", problem=f"voice {name} has no reference recording to compare with")


def test_a_recording_named_for_the_command_is_every_voices_reference(speech_24k) -> None:
    audio, decode = recordings(speech_24k)
    clip = clip_from_samples("mine.wav", audio[4], RATE)
    refs = references(["a", "b"], [], decode, RATE, override=clip)
    assert [(r.voice, r.source, r.band_limited) for r in refs.values()] == [("a", "mine.wav", clip.band_limited),
                                                                             ("b", "mine.wav", clip.band_limited)]
    assert refs["a"].embedding is not None and refs["a"].embedding is refs["b"].embedding  # embedded once


def test_rows_and_drift_as_the_report_shows_them(speech_24k) -> None:
    audio, decode = recordings(speech_24k)
    clip = clip_from_samples("guest", audio[1], RATE)
    refs = {"guest": Reference("guest", "g.wav", embed(clip), clip.band_limited)}
    turns = [TurnRecord("guest", 0, "How are you?", codes(2), seq=2), TurnRecord("guest", 0, "Fine.", codes(3), seq=5),
             TurnRecord("guest", 0, "Hm.", codes(5), seq=6)]
    rows = score_turns(turns, refs, decode, RATE)
    measured = rows[0].as_dict()
    assert rows[0].score is not None
    assert measured == {"turn": 2, "voice": "guest", "text": "How are you?", "seconds": 3.0,
                        **{k: v for k, v in rows[0].score.as_dict().items() if k != "file"}, "problem": None}
    assert rows[2].as_dict() == {"turn": 6, "voice": "guest", "text": "Hm.", "seconds": 0.2, "similarity": None,
                                 "verdict": "not measured", "problem": rows[2].problem}
    (d,) = drift(rows, refs)
    s2, s5 = rows[0].score.similarity, rows[1].score.similarity
    assert d.as_dict() == {"voice": "guest", "reference": "g.wav", "turns_measured": 2,
                           "mean": round((s2 + s5) / 2, 4), "slope_per_turn": round((s5 - s2) / 3, 5)}
    one = drift(rows[:1], refs)[0]
    assert one.slope is None and one.as_dict()["slope_per_turn"] is None and one.as_dict()["mean"] == round(s2, 4)
    assert drift([rows[2]], refs)[0].as_dict()["mean"] is None


def test_a_band_limited_reference_marks_every_score(speech_24k, data_dir) -> None:
    """From a profile's two recordings or from the command's one: the reference's band limit reaches the
    scores, and the source names each file."""
    from companion.eval.clips import load_clip
    from companion.voices import VoiceProfile, VoiceStore

    audio, decode = recordings(speech_24k)
    narrow = str(data_dir / "narrator_8k_u8.wav")
    profiles = VoiceStore()
    profiles.add(VoiceProfile(name="phone", audio=[narrow, narrow], transcript="On the phone."))
    override = load_clip(narrow)
    assert override.band_limited is not None
    turns = [TurnRecord("phone", 0, "How are you?", codes(2), seq=1)]
    for refs in (references(["phone"], [], decode, RATE, profiles=profiles),
                 references(["phone"], [], decode, RATE, override=override)):
        ref = refs["phone"]
        assert ref.voice == "phone" and ref.band_limited == override.band_limited and ref.problem is None
        (row,) = score_turns(turns, refs, decode, RATE)
        assert row.score is not None and row.score.band_limited == f"the reference: {override.band_limited}"
    assert references(["phone"], [], decode, RATE, profiles=profiles)["phone"].source == f"{narrow}, {narrow}"


def test_the_profiles_given_are_the_ones_read(speech_24k, data_dir, tmp_path) -> None:
    from companion.voices import VoiceStore

    audio, decode = recordings(speech_24k)
    (tmp_path / "guest.yaml").write_text(f"name: guest\naudio: {data_dir / 'guest.mp3'}\ntranscript: Hello.\n")
    elsewhere = VoiceStore(shipped_dir=tmp_path)
    ref = references(["guest"], [], decode, RATE, profiles=elsewhere)["guest"]
    assert ref.source == str(data_dir / "guest.mp3") and ref.embedding is not None
    assert references(["guest"], [], decode, RATE)["guest"].source == "none"  # the user's own profiles: none


def test_a_reference_that_cannot_be_measured_says_which_and_why(speech_24k, data_dir) -> None:
    from companion.store import VoiceRecord
    from companion.voices import VoiceProfile, VoiceStore

    audio, decode = recordings(speech_24k)
    silent = str(data_dir / "silence.wav")
    profiles = VoiceStore()
    profiles.add(VoiceProfile(name="quiet", audio=[silent], transcript="..."))
    refs = references(["quiet", "short"], [VoiceRecord("short", 2, "t", codes(5))], decode, RATE, profiles=profiles)
    assert refs["quiet"] == Reference("quiet", silent, problem=f"reference {silent}: quiet: contains only silence: "
                                                               "there is no voice in it to measure")  # fmt: skip
    short = refs["short"]
    assert (short.voice, short.source) == ("short", "the reference stored with the conversation")
    assert short.problem is not None and short.problem.startswith(
        "reference the reference stored with the conversation: short: too short to measure (")
    turns = [TurnRecord("quiet", 0, "Hello.", codes(2), seq=3), TurnRecord("short", 2, "Hi.", codes(1), seq=4)]
    rows = score_turns(turns, refs, decode, RATE)
    assert [r.problem for r in rows] == [refs["quiet"].problem, short.problem]


def test_a_turn_too_short_says_why_without_naming_itself_twice(speech_24k) -> None:
    audio, decode = recordings(speech_24k)
    clip = clip_from_samples("guest", audio[1], RATE)
    refs = {"guest": Reference("guest", "g.wav", embed(clip), None)}
    (row,) = score_turns([TurnRecord("guest", 0, "Hm.", codes(5), seq=7)], refs, decode, RATE)
    assert row.problem is not None and row.problem.startswith("too short to measure (0.")
    assert row.problem.endswith("s of speech, at least 1 s needed): use a longer clip")


def test_the_report_rounds_seconds_to_hundredths_and_the_slope_to_five_places() -> None:
    from companion.eval.conversation import Drift, TurnScore

    assert TurnScore(1, "v", "t", 1.23456, None).as_dict()["seconds"] == 1.23
    d = Drift("v", "r", turns=[1, 2], scores=[0.1, 0.1234567])
    assert d.as_dict()["slope_per_turn"] == 0.02346 and d.as_dict()["mean"] == 0.1117

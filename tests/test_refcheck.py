"""The transcript plausibility check (`voice add`, `doctor`) and a recording too long for the context,
found by `voice list`, `doctor` and `say` before the model loads."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from companion.audio.prepare import RECOMMENDED_LENGTH, prepare_references
from companion.cli import main
from companion.commands.doctor import FAIL, WARN, run_checks
from companion.config import ReferenceSettings, load_settings
from companion.paths import get_paths
from companion.refbudget import reference_cost
from companion.refcheck import RATE, REFUSE_RATIO, WARN_RATIO, check_transcript
from companion.voices import VoiceProfile, VoiceStore

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [("narrator.mp3", "narrator.txt"), ("narrator_48k.flac", "narrator.txt"), ("guest.mp3", "guest.txt"),
           ("guest_16k.wav", "guest.txt"), ("guest_22k.wav", "guest.txt")]


def _speech(data_dir: Path, audio: str) -> float:
    return sum(r.speech_seconds for r in prepare_references([data_dir / audio], ReferenceSettings()).reports)


@pytest.mark.parametrize(("audio", "transcript"), SHIPPED)
def test_the_shipped_clips_are_inside_the_quiet_band(data_dir: Path, audio: str, transcript: str) -> None:
    """The band docs/voices.md records: every shipped clip is spoken at RATE give or take 10%."""
    check = check_transcript((data_dir / transcript).read_text(encoding="utf-8"), _speech(data_dir, audio))
    assert 0.9 < check.ratio < 1.1, check
    assert check.refusal("v") is None and check.warnings("v") == []
    assert f"{RATE:.0f} letters" in (ROOT / "docs" / "voices.md").read_text(encoding="utf-8")


def test_the_band_edges() -> None:
    """Refused beyond 3x either way, warned beyond 1.7x, quiet inside (1% on either side of each edge)."""
    seconds = 100.0
    for ratio, refused, warned in [(1.0, False, False), (WARN_RATIO * 0.99, False, False), (1 / WARN_RATIO * 1.01, False, False), (WARN_RATIO * 1.01, False, True),
                                   (1 / WARN_RATIO / 1.01, False, True), (REFUSE_RATIO * 0.99, False, True), (1 / REFUSE_RATIO * 1.01, False, True),
                                   (REFUSE_RATIO * 1.01, True, False), (1 / REFUSE_RATIO / 1.01, True, False)]:
        check = check_transcript("a" * round(RATE * seconds * ratio), seconds)
        assert (check.refusal("v") is not None, bool(check.warnings("v"))) == (refused, warned), ratio


@pytest.mark.parametrize(
    ("transcript", "refused", "warning"),
    [
        ("Hi", "the transcript does not match the recording", None),
        ("😀🎉🔥 👍", "the transcript has no words in it", None),
        ("\u200b\u200b \t", "the transcript has no words in it", None),
        ("Honestly. " * 20000, "the transcript is much too long for the recording", None),
        ("今天天气很好，我们去公园散步吧。" * 5, None, "mostly in Han (Chinese characters) script"),
        ("السلام عليكم ورحمة الله وبركاته كيف حالك اليوم يا صديقي العزيز " * 4, None, "mostly in Arabic script"),
        ("Привет, как дела? Сегодня хорошая погода, пойдём гулять в парк. " * 4, None, "mostly in Cyrillic script"),
        ("Honestly, I had a long day. The train was late again, the meeting ran over, and I forgot my umbrella at the office.", None, "words missing"),
    ],
)
def test_transcripts_that_are_not_the_recordings_words(transcript: str, refused: str | None, warning: str | None) -> None:
    check = check_transcript(transcript, 18.3)  # guest.mp3's seconds of speech
    refusal = check.refusal("g")
    assert (refusal is not None) == (refused is not None), (refusal, check)
    if refused:
        assert refusal is not None and refusal.startswith("voice 'g': ") and refused in refusal
    if warning:
        assert any(warning in w for w in check.warnings("g")), check.warnings("g")


def test_add_refuses_hi_for_a_long_recording_and_takes_the_right_words(data_dir: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["voice", "add", "reader", "--audio", str(data_dir / "narrator.mp3"), "--transcript", "Hi"])
    err = capsys.readouterr().err
    assert code == 1
    assert re.search(r"error: voice 'reader': the transcript does not match the recording: 2 letters in 109\.\d s of "
                     r"speech .*: give all the words spoken in the recording", err), err
    assert "reader" not in VoiceStore().names() and not get_paths().voices_dir.exists()

    assert main(["voice", "add", "reader", "--audio", str(data_dir / "narrator.mp3"),
                 "--transcript-file", str(data_dir / "narrator.txt")]) == 0
    captured = capsys.readouterr()
    assert "added voice 'reader'" in captured.out and "warning" not in captured.err


def test_add_warns_of_a_transcript_in_another_script(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    chinese = "今天天气很好，我们去公园散步吧。" * 6  # about guest.mp3's length, in the wrong language
    assert main(["voice", "add", "g", "--audio", str(data_dir / "guest.mp3"), "--transcript", chinese]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: voice 'g': the transcript is mostly in Han (Chinese characters) script"), err


def test_a_transcript_too_long_for_the_budget_is_named_as_such(data_dir: Path) -> None:
    settings = load_settings(overrides={"model": {"id": "acme/not-downloaded"}, "context": {"max_seq_len": 512}})
    words = (data_dir / "guest.txt").read_text(encoding="utf-8") * 8
    refusal = reference_cost(settings, 24000 * 20, words, 0).refusal("g")
    assert refusal.startswith("voice 'g': its transcript (") and "is too long for the context" in refusal
    short = reference_cost(settings, 24000 * 60, "Hello there.", 0).refusal("g")
    assert "its reference (60.0 s" in short and "use a reference of at most" in short


def _long_voice(data_dir: Path) -> None:
    """narrator (118 s) with a context too small to hold it; the config is the user's."""
    get_paths().config_dir.mkdir(parents=True, exist_ok=True)
    get_paths().config_file.write_text("context:\n  max_seq_len: 1024\n", encoding="utf-8")
    VoiceStore().add(VoiceProfile(name="long", audio=[str(data_dir / "narrator.mp3")],
                                  transcript_file=str(data_dir / "narrator.txt")))
    VoiceStore().add(VoiceProfile(name="short", audio=[str(data_dir / "guest.mp3")],
                                  transcript_file=str(data_dir / "guest.txt")))


def test_a_recording_too_long_is_named_by_list_doctor_and_say_before_the_model(data_dir: Path) -> None:
    _long_voice(data_dir)
    listing = subprocess.run([sys.executable, "-m", "companion", "voice", "list"], capture_output=True, text=True,
                             timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})
    rows = {line.split("│")[1].strip(): line for line in listing.stdout.splitlines() if line.count("│") > 3}
    assert "too long" in rows["long"] and "ok" in rows["short"], listing.stdout
    refusal = re.search(r"✗ long: (voice 'long': its reference \(118\.0 s, \d+ positions\) does not fit the context .*)",
                        listing.stdout)
    assert refusal, listing.stdout

    said = subprocess.run([sys.executable, "-m", "companion", "say", "Hello", "--voice", "long", "--model",
                           "no-model-here"], capture_output=True, text=True, timeout=300)
    assert said.returncode == 1 and said.stderr.strip() == f"error: {refusal.group(1)}", said.stderr

    rows_by_name = {c.name: c for c in run_checks(get_paths())}
    assert rows_by_name["voice long"].status == FAIL and rows_by_name["voice long"].detail == refusal.group(1)
    assert "voice short" not in rows_by_name


def test_doctor_checks_the_transcripts_of_saved_voices(data_dir: Path) -> None:
    VoiceStore().add(VoiceProfile(name="hi", audio=[str(data_dir / "guest.mp3")], transcript="Hi."))
    VoiceStore().add(VoiceProfile(name="half", audio=[str(data_dir / "guest.mp3")],
                                  transcript="Honestly, I had a long day. The train was late again, the meeting ran over, and I forgot my umbrella at the office."))
    rows = {c.name: c for c in run_checks(get_paths())}
    assert rows["voice hi"].status == FAIL and "the transcript does not match the recording" in rows["voice hi"].detail
    assert rows["voice half"].status == WARN and "words missing" in rows["voice half"].detail
    assert "voice narrator" not in rows  # the shipped example is fine


def test_show_gives_the_rate_and_the_problem(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    VoiceStore().add(VoiceProfile(name="hi", audio=[str(data_dir / "guest.mp3")], transcript="Hi."))
    assert main(["voice", "show", "hi"]) == 0
    out = capsys.readouterr().out
    assert "transcript: 0.1 letters a second of speech (people speak about 13)" in out
    assert "✗ voice 'hi': the transcript does not match the recording: 2 letters in 18.3 s" in out
    assert main(["voice", "show", "narrator"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"transcript: 1[23]\.\d letters a second of speech", out) and "✗" not in out


@pytest.mark.parametrize("doc", ["README.md", "clone_files/README.md", "docs/voices.md", "config/voices/narrator.yaml"])
def test_one_advice_on_the_length(doc: str) -> None:
    """Every place that advises a length gives the one the messages give."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    assert set(re.findall(r"\d-\d minutes", text)) == {RECOMMENDED_LENGTH}, doc

"""`voice add` knows what a reference costs in memory: exact with the model's tokenizer, refused when it can never fit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from companion.audio.prepare import prepare_references
from companion.cli import main
from companion.config import load_settings
from companion.engine import Segment
from companion.paths import get_paths
from companion.refbudget import reference_cost
from companion.session.context import Context, Voice
from companion.voices import VoiceStore

ROOT = Path(__file__).resolve().parents[1]


def _config(text: str) -> None:
    get_paths().config_dir.mkdir(parents=True, exist_ok=True)
    get_paths().config_file.write_text(text, encoding="utf-8")


def test_cost_is_what_the_engine_counts(tiny_engine, tiny_model_dir: Path, data_dir: Path) -> None:
    settings = load_settings(overrides={"model": {"id": str(tiny_model_dir)}})
    prepared = prepare_references([data_dir / "guest.mp3"], settings.reference)
    transcript = (data_dir / "guest.txt").read_text(encoding="utf-8").strip()
    cost = reference_cost(settings, len(prepared.samples), transcript, 1)
    codes = tiny_engine.encode(prepared.samples)
    assert cost.exact and cost.frames == codes.shape[-1]
    assert cost.positions == tiny_engine.segment_positions(Segment(1, transcript, codes))
    assert cost.reserve == int(25 * 12.5) and cost.left == 4096 - cost.reserve - cost.positions


def test_refusal_matches_the_sessions_refusal(tiny_engine, tiny_model_dir: Path, data_dir: Path) -> None:
    """voice add and the session, given the same reference and config, name the same longest duration."""
    settings = load_settings(overrides={"model": {"id": str(tiny_model_dir)}, "context": {"max_seq_len": 512}})
    prepared = prepare_references([data_dir / "guest.mp3"], settings.reference)
    transcript = (data_dir / "guest.txt").read_text(encoding="utf-8").strip()
    cost = reference_cost(settings, len(prepared.samples), transcript, 0)
    assert not cost.fits
    context = Context(512, tiny_engine.segment_positions)
    with pytest.raises(Exception) as refused:
        context.pin(Voice("g", 0, transcript, tiny_engine.encode(prepared.samples)), cost.reserve)
    assert str(refused.value) == cost.refusal("g")


def test_add_refuses_what_cannot_fit_and_keeps_nothing(tiny_model_dir: Path, data_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _config(f"model:\n  id: {tiny_model_dir}\ncontext:\n  max_seq_len: 1024\n")
    code = main(["voice", "add", "long", "--audio", str(data_dir / "narrator.mp3"),
                 "--transcript-file", str(data_dir / "narrator.txt")])
    err = capsys.readouterr().err
    assert code == 1, err
    m = re.search(r"error: voice 'long': its reference \(118\.0 s, (\d+) positions\) does not fit the context "
                  r"\(1024 positions, 664 left after the reply's frames\): use a reference of at most ([\d.]+) s", err)
    assert m, err
    assert 0 < float(m.group(2)) < 118.0
    assert "long" not in VoiceStore().names()


def test_add_says_what_is_left_for_the_conversation(tiny_model_dir: Path, data_dir: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    _config(f"model:\n  id: {tiny_model_dir}\n")
    assert main(["voice", "add", "guest", "--audio", str(data_dir / "guest.mp3"),
                 "--transcript-file", str(data_dir / "guest.txt")]) == 0
    out = capsys.readouterr().out
    m = re.search(r"memory: the reference takes (\d+) of 4096 positions; 312 are kept for each reply; (\d+) are left "
                  r"for the conversation \(about (\d+) s of talk", out)
    assert m, out
    assert int(m.group(1)) + 312 + int(m.group(2)) == 4096 and int(m.group(3)) > 60


def test_without_the_model_the_cost_is_an_estimate_on_the_safe_side(tiny_model_dir: Path, data_dir: Path) -> None:
    transcript = (data_dir / "narrator.txt").read_text(encoding="utf-8").strip()
    exact = reference_cost(load_settings(overrides={"model": {"id": str(tiny_model_dir)}}), 24000 * 60, transcript, 0)
    guess = reference_cost(load_settings(overrides={"model": {"id": "acme/not-downloaded"}}), 24000 * 60, transcript, 0)
    assert exact.exact and not guess.exact and guess.frames == exact.frames == 750
    assert "(estimated: the model is not downloaded yet)" in guess.summary()


ADVICE = re.compile(r"(\d)-(\d) minutes")


@pytest.mark.parametrize("doc", ["clone_files/README.md", "config/voices/narrator.yaml", "docs/voices.md",
                                 "companion/audio/prepare.py"])
def test_the_recommended_length_fits_the_default_budget(doc: str, data_dir: Path) -> None:
    """The longest recommended reference, spoken at the shipped narrator's rate, leaves at least a minute
    of conversation with the default config (counted on the safe side, without the real tokenizer)."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    found = ADVICE.findall(text)
    assert found, f"{doc} gives no 'N-M minutes' advice"
    transcript = (data_dir / "narrator.txt").read_text(encoding="utf-8").strip()
    words_per_second = len(transcript.split()) / 109.4  # the narrator's speech time
    settings = load_settings(overrides={"model": {"id": "acme/not-downloaded"}})
    for _, longest in found:
        seconds = int(longest) * 60
        words = transcript.split() * 3
        spoken = " ".join(words[: int(words_per_second * seconds)])
        cost = reference_cost(settings, 24000 * seconds, spoken, 0)
        assert cost.fits and cost.left_seconds >= 60, (doc, longest, cost.summary())

"""`companion eval voice`: speaker similarity of real audio files through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soxr

from companion.eval.clips import clip_from_samples, load_clip
from companion.eval.conversation import Drift
from companion.eval.similarity import BANDS, TOO_NARROW, verdict


def companion(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "companion", *args], capture_output=True, text=True,
                          env=os.environ.copy(), cwd=cwd, timeout=900)


NARRATOR_FULL_BAND = ["narrator_48k.flac", "narrator_44k_stereo_30s.wav"]
GUESTS = ["guest.mp3", "guest_16k.wav", "guest_22k.wav"]
NARROW = "narrator_8k_u8.wav"


@pytest.mark.slow
def test_narrator_clips_score_above_every_guest_and_8k_is_too_narrow(data_dir: Path) -> None:
    run = companion("eval", "voice", "narrator.mp3", *NARRATOR_FULL_BAND, *GUESTS, NARROW, "--json", cwd=data_dir)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["errors"] == [] and report["reference"]["band_limited"] is None
    got = {r["file"]: r for r in report["results"]}
    assert list(got) == [*NARRATOR_FULL_BAND, *GUESTS, NARROW]

    # The same speaker in full band beats every other speaker, however similar (both are one synthesizer).
    assert min(got[f]["similarity"] for f in NARRATOR_FULL_BAND) > max(got[f]["similarity"] for f in GUESTS)
    for f in NARRATOR_FULL_BAND:
        assert got[f]["similarity"] > 0.97 and got[f]["verdict"] == "same voice" and got[f]["band_limited"] is None
    for f in GUESTS:
        assert 0.85 < got[f]["similarity"] < 0.95 and got[f]["verdict"] == "similar voice"
    # Telephone-band audio of the right speaker scores below the other speaker: the report must not judge it.
    narrow = got[NARROW]
    assert narrow["similarity"] < min(got[f]["similarity"] for f in GUESTS)
    assert narrow["verdict"] == TOO_NARROW and narrow["source_rate"] == 8000
    assert narrow["band_limited"] == "sampled at 8 kHz, nothing above 4 kHz"


def test_table_and_one_line_errors(data_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.wav"
    run = companion("eval", "voice", "guest.mp3", "guest_16k.wav", NARROW, "short.wav", "silence.wav", "empty.wav",
                    "not_audio.wav", str(missing), cwd=data_dir)
    assert run.returncode == 1  # some files could not be measured
    out = run.stdout.splitlines()
    assert out[0] == "reference: guest.mp3 (24 kHz, 19.2 s of speech)"
    assert out[1].split() == ["FILE", "SIMILARITY", "VERDICT"]
    assert out[2].split()[0] == "guest_16k.wav" and out[2].endswith("same voice")
    assert out[3].split()[0] == NARROW and out[3].endswith(f"{TOO_NARROW} (sampled at 8 kHz, nothing above 4 kHz)")
    assert len(out) == 4
    errors = run.stderr.splitlines()
    assert errors == [
        "error: short.wav: too short to measure (0.2 s of speech, at least 1 s needed): use a longer clip",
        "error: silence.wav: contains only silence: there is no voice in it to measure",
        "error: empty.wav: file is empty (0 bytes): record or export it again",
        "error: not_audio.wav: not a readable audio file (Format not recognised): use a WAV, MP3, FLAC or OGG "
        "file, or re-export it",
        f"error: {missing}: file not found: check the path (relative paths start in the current folder)",
    ]


def test_unreadable_reference_is_one_line(data_dir: Path) -> None:
    run = companion("eval", "voice", "truncated.mp3", "guest.mp3", cwd=data_dir)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.splitlines() == [
        "error: truncated.mp3: file is truncated: its header declares 118.3 s but only 1.6 s can be decoded; "
        "re-download or re-export the complete file"
    ]


def test_band_limit_is_measured_not_read_from_the_header(data_dir: Path) -> None:
    full = load_clip(data_dir / "narrator_44k_stereo_30s.wav")
    assert full.band_limited is None and full.high_band_share > 0.005
    # Telephone audio saved at 44.1 kHz: the header says full band, the spectrum does not.
    phone = load_clip(data_dir / NARROW)
    upsampled = soxr.resample(phone.samples, 16_000, 44_100)
    clip = clip_from_samples("phone.wav", upsampled, 44_100)
    assert clip.source_rate == 44_100 and clip.band_limited is not None
    assert clip.band_limited.endswith("of its energy above 4 kHz (full-band speech has about 1%)")


def test_verdict_bands_are_ordered_and_cover_every_score() -> None:
    lows = [low for low, _ in BANDS]
    assert lows == sorted(lows, reverse=True) and lows[-1] == -1.0
    assert [verdict(s) for s in (1.0, 0.95, 0.949, 0.85, 0.8, 0.75, 0.5, -1.0)] == [
        "same voice", "same voice", "similar voice", "similar voice", "weak resemblance", "weak resemblance",
        "different voice", "different voice"]


def test_drift_is_the_least_squares_slope_per_turn() -> None:
    d = Drift("v", "ref", turns=[1, 2, 4], scores=[0.9, 0.8, 0.6])
    assert d.mean == pytest.approx(0.7667, abs=1e-4)
    assert d.slope == pytest.approx(-0.1)
    assert Drift("v", "ref", turns=[3], scores=[0.9]).slope is None
    assert Drift("v", "ref").mean is None
    np.testing.assert_allclose(d.as_dict()["slope_per_turn"], -0.1)

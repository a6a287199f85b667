"""`companion voice add/list/show/remove` through the real CLI (a subprocess for the round trip)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from companion.cli import main
from companion.paths import get_paths
from companion.voices import VoiceProfile, VoiceStore


def companion(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "companion", *args], capture_output=True, text=True, timeout=180,
        env={**os.environ, "COLUMNS": "200"},  # a wide terminal: table rows stay on one line
    )


def test_round_trip_on_narrator_and_guest(data_dir: Path) -> None:
    voices = get_paths().voices_dir
    taken = companion("voice", "add", "narrator", "--audio", str(data_dir / "narrator.mp3"),
                      "--transcript-file", str(data_dir / "narrator.txt"))
    assert taken.returncode == 1 and taken.stderr.startswith("error: voice 'narrator' already exists (")
    assert "config/voices/narrator.yaml): choose another name or pass --force" in taken.stderr

    narrator = companion("voice", "add", "narrator", "--audio", str(data_dir / "narrator.mp3"),
                         "--transcript-file", str(data_dir / "narrator.txt"), "--force")
    assert narrator.returncode == 0, narrator.stderr
    assert f"added voice 'narrator' -> {voices / 'narrator.yaml'}" in narrator.stdout
    assert "narrator.mp3: 44100 Hz x2, 118.3 s -> " in narrator.stdout and "-> -23.0 LUFS" in narrator.stdout

    words = " ".join([(data_dir / "guest.txt").read_text(encoding="utf-8").strip()] * 2)  # both recordings say it
    guest = companion("voice", "add", "guest", "--audio", str(data_dir / "guest.mp3"), "--audio",
                      str(data_dir / "guest_22k.wav"), "--transcript", words,
                      "--speaker", "1", "--temperature", "0.7")
    assert guest.returncode == 0, guest.stderr
    assert "guest.mp3: 24000 Hz x1" in guest.stdout and "guest_22k.wav: 22050 Hz x1" in guest.stdout
    assert "total: " in guest.stdout

    listing = companion("voice", "list")
    assert listing.returncode == 0
    rows = [line for line in listing.stdout.splitlines() if "guest" in line or "narrator" in line]
    assert len(rows) == 2 and all("yours" in row for row in rows)
    assert "guest.mp3, guest_22k.wav" in rows[0] and "│ 1 " in rows[0]

    show = companion("voice", "show", "guest")
    assert show.returncode == 0
    for expected in ["voice:      guest", f"profile:    {voices / 'guest.yaml'}", "speaker:    1",
                     f"transcript: {words[:69]}… ({len(words.split())} words)", "generation: temperature=0.7",
                     "guest.mp3: 24000 Hz x1, 19.9 s -> ", "memory: the reference takes "]:
        assert expected in show.stdout

    for name in ["guest", "narrator"]:
        removed = companion("voice", "remove", name)
        assert removed.returncode == 0 and f"removed voice '{name}'" in removed.stdout
    assert list(voices.iterdir()) == []
    after = companion("voice", "list")
    assert "example" in after.stdout and "guest" not in after.stdout  # the shipped narrator is back


def test_an_invalid_profile_is_marked_and_fails_only_itself_with_one_line() -> None:
    voices = get_paths().voices_dir
    voices.mkdir(parents=True)
    (voices / "bob.yaml").write_text("name: bob\nspeaker: 0\nspeeker: 1\n", encoding="utf-8")
    line = f"{voices / 'bob.yaml'}: unknown key 'speeker' (line 3): remove it or check its spelling"
    run = companion("voice", "list")
    assert run.returncode == 0 and f"✗ bob: {line}\n" in run.stdout and "narrator" in run.stdout
    shown = companion("voice", "show", "bob")
    assert shown.returncode == 1 and shown.stdout == "" and shown.stderr == f"error: {line}\n"


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--audio", "{data}/guest.mp3"], 2, "transcript missing: pass --transcript TEXT or --transcript-file FILE"),
        (["--audio", "{data}/guest.mp3", "--transcript", " "], 2, "--transcript is empty"),
        (["--audio", "{data}/guest.mp3", "--transcript-file", "{data}/empty.wav"], 1, "transcript file is empty"),
        (["--audio", "{data}/guest.mp3", "--transcript-file", "{data}/nope.txt"], 1, "transcript file not found"),
        (["--audio", "{data}/nope.wav", "--transcript", "hi"], 1, "nope.wav' not found: check the path"),
        (["--audio", "{data}", "--transcript", "hi"], 1, "is a directory: give one audio file"),
        (["--audio", "{data}/empty.wav", "--transcript", "hi"], 1, "file is empty (0 bytes)"),
        (["--audio", "{data}/guest.mp3", "--transcript", "hi", "--speaker", "-2"], 2, "--speaker -2: must be greater than or equal to 0"),
    ],
)
def test_voice_add_refuses_bad_input(
    data_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, expected: str
) -> None:
    argv = ["voice", "add", "x", *[a.format(data=data_dir) for a in args]]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert not get_paths().voices_dir.exists() or not list(get_paths().voices_dir.iterdir())


def test_unknown_voice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["voice", "show", "nobody"]) == 1
    assert capsys.readouterr().err == (
        "error: unknown voice 'nobody' (voices: narrator): add it with `companion voice add nobody --audio FILE ...`\n"
    )


def test_show_the_shipped_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["voice", "show", "narrator"]) == 0
    out = capsys.readouterr().out
    assert "clone_files/narrator.mp3" in out and "(344 words)" in out
    assert "narrator.mp3: 44100 Hz x2, 118.3 s -> 118.0 s" in out


def test_voice_encode_caches_across_runs(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["voice", "encode", "narrator", "--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "narrator: 1475 frames x 32 codebooks (118.0 s), prepared and encoded in " in first
    assert "narrator.mp3: 44100 Hz x2, 118.3 s -> 118.0 s" in first
    assert "narrator: 1475 frames x 32 codebooks (118.0 s), loaded from the cache in " in second
    assert len(list(get_paths().reference_cache_dir.glob("*.safetensors"))) == 1


def test_add_refers_to_clone_files_by_name_and_shows_a_voice_without_audio(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clone_dir = get_paths().clone_dir
    clone_dir.mkdir(parents=True)
    shutil.copy(data_dir / "guest_16k.wav", clone_dir / "take.wav")
    shutil.copy(data_dir / "guest.txt", clone_dir / "take.txt")
    argv = ["voice", "add", "g", "--audio", str(clone_dir / "take.wav"), "--transcript-file", str(clone_dir / "take.txt")]
    assert main(argv) == 0
    text = (get_paths().voices_dir / "g.yaml").read_text(encoding="utf-8")
    assert text == "name: g\nspeaker: 0\naudio: take.wav\ntranscript_file: take.txt\n"
    VoiceStore().add(VoiceProfile(name="blank", speaker=2))
    capsys.readouterr()
    assert main(["voice", "show", "blank"]) == 0
    out = capsys.readouterr().out
    assert "audio:      none yet" in out and "transcript" not in out and "prepared" not in out


def test_a_persona_is_kept_and_shown(capsys: pytest.CaptureFixture[str]) -> None:
    voices = get_paths().voices_dir
    voices.mkdir(parents=True)
    (voices / "pirate.yaml").write_text("name: pirate\npersona: |\n  You are a cheerful pirate.\n  Answer briefly.\n")
    assert main(["voice", "show", "pirate"]) == 0
    assert "persona:    You are a cheerful pirate. Answer briefly." in capsys.readouterr().out
    store = VoiceStore()
    store.attach_reference(store.get("pirate"), np.zeros(24000, np.float32), "Ahoy.")  # a rewrite keeps it
    assert store.get("pirate").persona == "You are a cheerful pirate.\nAnswer briefly.\n"
    (voices / "pirate.yaml").write_text("name: pirate\npersona: '  '\n")
    assert main(["voice", "show", "pirate"]) == 1
    assert "persona" in capsys.readouterr().err

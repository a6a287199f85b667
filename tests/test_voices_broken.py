"""One broken voice profile is reported and every other voice keeps working (list, get, doctor, say)."""

from __future__ import annotations

from pathlib import Path

import pytest

from companion.cli import main
from companion.errors import CompanionError
from companion.paths import get_paths
from companion.voices import VoiceProfile, VoiceStore


@pytest.fixture
def voices(data_dir: Path) -> Path:
    """g16: an unknown key; g32: audio that does not exist; g96: a good voice."""
    folder = get_paths().voices_dir
    folder.mkdir(parents=True)
    (folder / "g16.yaml").write_text("name: g16\nspeeker: 1\n", encoding="utf-8")
    (folder / "g32.yaml").write_text("name: g32\naudio: /nowhere/g32.wav\ntranscript: hi\n", encoding="utf-8")
    VoiceStore().add(VoiceProfile(name="g96", audio=[str(data_dir / "guest.mp3")],
                                  transcript=(data_dir / "guest.txt").read_text(encoding="utf-8")))
    return folder


def test_other_voices_keep_working(voices: Path) -> None:
    store = VoiceStore()
    assert store.get("g96").name == "g96" and store.get("narrator").name == "narrator"
    assert store.names() == ["g32", "g96", "narrator"]
    assert [(b.name, b.path.name) for b in store.broken()] == [("g16", "g16.yaml")]
    with pytest.raises(CompanionError, match=r"g16.yaml: unknown key 'speeker' \(line 2\)"):
        store.get("g16")  # only the broken voice itself fails, with its own error
    assert store.problem(store.get("g32")) == f"{voices / 'g32.yaml'}: file '/nowhere/g32.wav' not found: check the path"
    assert store.problem(store.get("g96")) is None


def test_voice_list_marks_the_broken_and_the_missing(voices: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["voice", "list"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert "broken" in rows["g16"] and "file missing" in rows["g32"]
    assert rows["g96"].rstrip("│ ").endswith("ok") and rows["narrator"].rstrip("│ ").endswith("ok")
    assert f"✗ g16: {voices / 'g16.yaml'}: unknown key 'speeker' (line 2): remove it or check its spelling" in out
    assert f"✗ g32: {voices / 'g32.yaml'}: file '/nowhere/g32.wav' not found: check the path" in out


def test_doctor_fails_each_unusable_voice_with_its_line(voices: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["doctor"]) == 1
    out, err = capsys.readouterr()
    rows = {cells[1].strip(): cells for line in out.splitlines() if len(cells := line.split("│")) > 3}
    assert rows["voice g16"][2].strip() == "FAIL" and "unknown key 'speeker'" in rows["voice g16"][3]
    assert rows["voice g32"][2].strip() == "FAIL" and "'/nowhere/g32.wav' not found" in rows["voice g32"][3]
    assert "voice g96" not in rows and "voice narrator" not in rows
    assert "2 cannot be used" in rows["voices"][3]
    assert err.strip().endswith("voice g16, voice g32")


def test_add_does_not_overwrite_a_broken_profile(voices: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["voice", "add", "g16", "--audio", str(data_dir / "guest.mp3"), "--transcript", "Hi."]) == 1
    assert "voice 'g16' already exists but cannot be read" in capsys.readouterr().err
    assert "speeker" in (voices / "g16.yaml").read_text(encoding="utf-8")


@pytest.mark.parametrize(("voice", "message"), [
    ("g16", "g16.yaml: unknown key 'speeker' (line 2): remove it or check its spelling"),
    ("g32", "g32.yaml: file '/nowhere/g32.wav' not found: check the path"),
    ("nosuch", "unknown voice 'nosuch' (voices: g32, g96, narrator)"),
])
def test_say_and_chat_check_the_voice_before_loading_the_model(
        voices: Path, voice: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The model named does not exist: an error about the voice proves the voice was checked first."""
    no_model = str(tmp_path / "no-model-here")
    for argv in (["say", "Hello.", "--voice", voice, "--model", no_model, "-o", str(tmp_path / "x.wav")],
                 ["chat", "--voice", voice, "--model", no_model, "--save-dir", str(tmp_path)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert message in err and "model" not in err.replace("g16.yaml", ""), err

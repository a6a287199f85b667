"""`companion watermark embed/detect` through the real entry point, on real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from companion.cli import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_embed_then_detect_with_default_key(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "marked.wav"
    code, out, _ = _run(capsys, "watermark", "embed", str(data_dir / "guest_16k.wav"), str(out_file))
    assert code == 0 and "wrote" in out
    info = sf.info(out_file)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")

    code, out, _ = _run(capsys, "watermark", "detect", str(out_file))
    assert code == 0
    assert out.startswith(f"{out_file}: watermark found (score ") and out.count("\n") == 1
    score = float(out.split("score ")[1].split(",")[0])
    assert score > 20.0

    code, out, _ = _run(capsys, "watermark", "detect", str(out_file), "--key", "someone-else")
    assert code == 1 and "no watermark" in out


def test_unmarked_file_exits_1(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "watermark", "detect", str(data_dir / "narrator_48k.flac"))
    assert code == 1 and "no watermark (score" in out


def test_key_comes_from_config(
    tmp_path: Path, data_dir: Path, companion_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (companion_home / "config").mkdir()
    (companion_home / "config" / "config.yaml").write_text("watermark:\n  key: from-config\n", encoding="utf-8")
    out_file = tmp_path / "marked.mp3"
    assert _run(capsys, "watermark", "embed", str(data_dir / "guest.mp3"), str(out_file))[0] == 0
    assert sf.info(out_file).format == "MP3"
    assert _run(capsys, "watermark", "detect", str(out_file), "--key", "from-config")[0] == 0
    assert _run(capsys, "watermark", "detect", str(out_file), "--key", "companion")[0] == 1
    assert _run(capsys, "watermark", "detect", str(out_file))[0] == 0


def test_stereo_48k_flac_keeps_format(tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in.flac"
    audio, rate = sf.read(data_dir / "narrator_48k.flac", frames=48000 * 8)
    sf.write(src, audio, rate)
    dst = tmp_path / "out.flac"
    assert _run(capsys, "watermark", "embed", str(src), str(dst))[0] == 0
    info = sf.info(dst)
    assert (info.samplerate, info.channels, info.format) == (48000, 2, "FLAC")
    assert _run(capsys, "watermark", "detect", str(dst))[0] == 0
    assert list(tmp_path.glob(".*.tmp")) == []


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        # detect: 2 when the file cannot be judged (1 means only "no watermark")
        (["detect", "{data}/short.wav"], 2, "too short to judge"),
        (["detect", "{data}/not_audio.wav"], 2, "not a readable audio file (Format not recognised): use a WAV"),
        (["detect", "{tmp}/missing.wav"], 2, "file not found"),
        (["detect", "{data}/empty.wav"], 2, "file is empty"),
        (["embed", "{data}/guest_16k.wav", "{tmp}/out.xyz"], 2, "unknown audio extension '.xyz'"),
        (["detect", "{data}/guest_16k.wav", "--key", ""], 2, "the watermark key is empty"),
        ([], 2, "missing action"),
    ],
)
def test_errors_are_one_line(
    argv: list[str], code: int, needle: str, tmp_path: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [a.format(data=data_dir, tmp=tmp_path) for a in argv]
    got, out, err = _run(capsys, "watermark", *args)
    assert got == code
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.xyz").exists()


def test_installed_entry_point(tmp_path: Path, data_dir: Path) -> None:
    dst = tmp_path / "m.wav"
    cmd = [sys.executable, "-m", "companion", "watermark"]
    embed = subprocess.run([*cmd, "embed", str(data_dir / "guest_22k.wav"), str(dst)], capture_output=True, text=True)
    assert embed.returncode == 0, embed.stderr
    detect = subprocess.run([*cmd, "detect", str(dst)], capture_output=True, text=True)
    assert detect.returncode == 0 and "watermark found" in detect.stdout

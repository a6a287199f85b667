"""companion.audio.io: decoding real files of every kind, refusing bad ones, writing WAV atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from companion.audio.io import read_audio, write_wav
from companion.errors import CompanionError


@pytest.mark.parametrize(
    ("name", "rate", "channels"),
    [
        ("narrator.mp3", 44100, 2),
        ("narrator_48k.flac", 48000, 2),
        ("narrator_44k_stereo_30s.wav", 44100, 2),
        ("narrator_8k_u8.wav", 8000, 1),
        ("guest.mp3", 24000, 1),
        ("guest_16k.wav", 16000, 1),
        ("guest_22k.wav", 22050, 1),
    ],
)
def test_reads_every_good_clip_as_float32(data_dir: Path, name: str, rate: int, channels: int) -> None:
    audio, sr = read_audio(data_dir / name)
    assert sr == rate
    assert audio.dtype == np.float32
    assert audio.ndim == 2 and audio.shape[1] == channels
    assert 0.1 < float(np.abs(audio).max()) <= 1.0
    assert abs(len(audio) - sf.info(str(data_dir / name)).frames) <= 0.01 * len(audio)


@pytest.mark.parametrize("subtype", ["PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_reads_other_bit_depths(data_dir: Path, tmp_path: Path, subtype: str) -> None:
    src, sr = sf.read(str(data_dir / "guest_16k.wav"), dtype="float32")
    path = tmp_path / f"guest_{subtype}.wav"
    sf.write(str(path), src, sr, subtype=subtype)
    audio, rate = read_audio(path)
    assert rate == 16000
    np.testing.assert_allclose(audio[:, 0], src, atol=1e-4)


def test_reads_ogg_vorbis(data_dir: Path, tmp_path: Path) -> None:
    src, sr = sf.read(str(data_dir / "guest_22k.wav"), dtype="float32")
    path = tmp_path / "guest.ogg"
    sf.write(str(path), src, sr, format="OGG", subtype="VORBIS")
    audio, rate = read_audio(path)
    assert rate == 22050 and abs(len(audio) - len(src)) < 0.01 * len(src)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("empty.wav", "file is empty (0 bytes)"),
        ("not_audio.wav", "not a readable audio file"),
        ("truncated.mp3", "file is truncated: its header declares 118.3 s but only 1.6 s can be decoded"),
        ("does_not_exist.wav", "file not found"),
    ],
)
def test_refuses_bad_files_in_one_line(data_dir: Path, name: str, expected: str) -> None:
    with pytest.raises(CompanionError) as err:
        read_audio(data_dir / name)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and str(data_dir / name) in message


def test_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CompanionError, match="is a directory: give one audio file"):
        read_audio(tmp_path)


def test_refuses_nan_and_inf(tmp_path: Path) -> None:
    samples = np.sin(np.linspace(0, 2000, 24000)).astype(np.float32)
    samples[100] = np.nan
    samples[200] = np.inf
    sf.write(str(tmp_path / "nan.wav"), samples, 24000, subtype="FLOAT")
    with pytest.raises(CompanionError, match="NaN or infinite samples"):
        read_audio(tmp_path / "nan.wav")


def test_truncated_mp3_does_not_leak_decoder_warnings(data_dir: Path, capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CompanionError):
        read_audio(data_dir / "truncated.mp3")
    assert "Xing" not in capfd.readouterr().err


def test_write_wav_round_trips_and_leaves_no_temp_files(tmp_path: Path) -> None:
    audio = (0.5 * np.sin(np.linspace(0, 3000, 48000))).astype(np.float32)
    path = tmp_path / "out" / "reply.wav"
    write_wav(path, audio, 24000)
    back, rate = read_audio(path)
    assert rate == 24000 and sf.info(str(path)).subtype == "PCM_16"
    np.testing.assert_allclose(back[:, 0], audio, atol=1 / 16000)
    write_wav(path, np.full(10, 3.0, dtype=np.float32), 24000)  # over range: clipped, not wrapped
    assert float(read_audio(path)[0].min()) > 0.99
    assert [p.name for p in path.parent.iterdir()] == ["reply.wav"]

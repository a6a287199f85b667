"""`companion doctor` on real folders, a real HF cache layout, a real config file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from companion.cli import main
from companion.config import load_settings, user_config_template


def _doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["doctor", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _row(out: str, name: str) -> str:
    """The table line whose first cell is ``name``."""
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] == name:
            return line
    raise AssertionError(f"no {name!r} row in:\n{out}")


def _subprocess_doctor(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "companion", "doctor", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )


def test_fresh_install(companion_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _doctor(capsys)
    assert code == 0
    assert torch.__version__ in _row(out, "torch")
    assert "ok" in _row(out, "config") and "not created" in _row(out, "config")
    assert str(companion_home / "data") in _row(out, "data dir")
    assert "not downloaded yet: run `companion download`" in _row(out, "model")
    assert "disabled" in _row(out, "llm")
    for name in ("python", "transformers", "device", "audio", "cache dir", "voices"):
        _row(out, name)


def test_init_config_writes_the_template_once(companion_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = companion_home / "config" / "config.yaml"
    code, out, _ = _doctor(capsys, "--init-config")
    assert code == 0 and f"wrote the default config to {config}" in out
    assert config.read_text(encoding="utf-8") == user_config_template()
    assert load_settings().model.id == "sesame/csm-1b"
    assert "(valid)" in _row(out, "config")

    config.write_text("model:\n  id: my/model\n", encoding="utf-8")
    code, out, _ = _doctor(capsys, "--init-config")
    assert code == 0 and "already exists: left unchanged" in out
    assert config.read_text(encoding="utf-8") == "model:\n  id: my/model\n"


def test_invalid_config_fails(companion_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = companion_home / "config" / "config.yaml"
    config.parent.mkdir()
    config.write_text("model:\n  idd: x\n", encoding="utf-8")
    code, out, err = _doctor(capsys)
    assert code == 1
    row = _row(out, "config")
    assert "FAIL" in row and "idd" in out
    assert err.strip() == "doctor: 1 problem(s) to fix: config"


def test_local_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "csm"
    folder.mkdir()
    monkeypatch.setenv("COMPANION_MODEL", str(folder))
    code, out, _ = _doctor(capsys)
    assert code == 1 and "FAIL" in _row(out, "model") and "missing config.json, *.safetensors" in out

    (folder / "config.json").write_text("{}", encoding="utf-8")
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    code, out, _ = _doctor(capsys)
    assert code == 0 and "(local folder)" in _row(out, "model")


def test_model_found_in_hf_cache(tmp_path: Path, companion_home: Path) -> None:
    """A real hub cache layout (refs/main -> snapshots/<commit>/...), read without network."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-csm"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit, encoding="utf-8")
    for name, data in (("config.json", b"{}"), ("model.safetensors", b"\0" * 2048)):
        blob = repo / "blobs" / f"blob-{name}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(blob)
    result = _subprocess_doctor({"HF_HUB_CACHE": str(tmp_path / "hub"), "COMPANION_MODEL": "acme/tiny-csm"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "acme/tiny-csm: in the HF cache (2.0K)" in _row(result.stdout, "model")  # 2050 bytes of blobs


def test_voices_are_counted(companion_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    voices = companion_home / "data" / "voices"
    voices.mkdir(parents=True)
    for name in ("a.yaml", "b.yml", "notes.txt"):
        (voices / name).write_text(f"name: {name[0]}\n", encoding="utf-8")
    code, out, _ = _doctor(capsys)
    assert code == 0 and f"2 yours in {voices}" in _row(out, "voices")


def test_missing_portaudio_is_a_warning(tmp_path: Path, companion_home: Path) -> None:
    """A sounddevice that cannot find its library (as on a machine without PortAudio): a warning row."""
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n", encoding="utf-8")
    result = _subprocess_doctor({"PYTHONPATH": str(stub)})
    assert result.returncode == 0, result.stdout + result.stderr
    row = _row(result.stdout, "audio")
    assert "warn" in row and "PortAudio not available (PortAudio library not found)" in row


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_fails(companion_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (companion_home / "config").mkdir()
    (companion_home / "config" / "config.yaml").write_text("model:\n  device: cuda\n", encoding="utf-8")
    code, out, err = _doctor(capsys)
    assert code == 1 and "torch sees no CUDA GPU" in _row(out, "device")
    assert "device" in err and "context" not in err  # one problem, reported once
    assert "not checked" in _row(out, "context")


def test_llm_row_never_shows_the_key(
    companion_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (companion_home / "config").mkdir()
    (companion_home / "config" / "config.yaml").write_text(
        "llm:\n  enabled: true\n  api_key_env: MY_LLM_KEY\n", encoding="utf-8"
    )
    monkeypatch.setenv("MY_LLM_KEY", "sk-secret-value-123")
    code, out, err = _doctor(capsys)
    assert code == 0 and "$MY_LLM_KEY set" in _row(out, "llm")
    assert "sk-secret-value-123" not in out + err

"""Loading failures are one-line ModelLoadErrors that say what is wrong and how to fix it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from companion.engine import Engine, ModelLoadError
from companion.engine.loading import hub_error, select_device, select_dtype


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line(err: pytest.ExceptionInfo[ModelLoadError]) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        Engine.load(str(tmp_path / "nowhere"), device="cpu")
    text = _one_line(err)
    assert "does not exist" in text and "--model" in text


def test_missing_config(tmp_path: Path, tiny_model_dir: Path) -> None:
    ckpt = _copy(tiny_model_dir, tmp_path / "ckpt")
    (ckpt / "config.json").unlink()
    with pytest.raises(ModelLoadError) as err:
        Engine.load(str(ckpt), device="cpu")
    text = _one_line(err)
    assert "config.json is missing" in text and "companion download" in text


def test_missing_weights(tmp_path: Path, tiny_model_dir: Path) -> None:
    ckpt = _copy(tiny_model_dir, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError) as err:
        Engine.load(str(ckpt), device="cpu")
    assert "no model.safetensors" in _one_line(err)


def test_corrupt_safetensors(tmp_path: Path, tiny_model_dir: Path) -> None:
    ckpt = _copy(tiny_model_dir, tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])  # a download cut short
    with pytest.raises(ModelLoadError) as err:
        Engine.load(str(ckpt), device="cpu")
    text = _one_line(err)
    assert str(ckpt) in text and "corrupt" in text and "companion download" in text


def test_offline_hub_id_without_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    with pytest.raises(ModelLoadError) as err:
        Engine.load("sesame/csm-1b", device="cpu")
    text = _one_line(err)
    assert "sesame/csm-1b is not in the local cache" in text
    assert "companion download --model sesame/csm-1b" in text


def test_gated_repo_message_names_login_and_ungated_copy() -> None:
    from huggingface_hub import errors as hf

    # The HTTP library huggingface_hub itself uses (httpx or its fork), reached through its errors module.
    response = hf.Response(401, request=_request(hf))
    err = hub_error(hf.GatedRepoError("gated", response=response), "sesame/csm-1b", None)
    assert err is not None
    text = str(err)
    assert "gated" in text and "hf auth login" in text and "unsloth/csm-1b" in text


def _request(hf):  # -> the HTTP library's Request
    import importlib

    http = importlib.import_module(hf.Response.__module__.split(".")[0])
    return http.Request("GET", "https://huggingface.co/api/models/sesame/csm-1b")


def test_device_and_dtype_selection() -> None:
    assert select_device("cpu") == torch.device("cpu")
    assert select_dtype("auto", torch.device("cpu")) == torch.float32
    assert select_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert select_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            select_device("cuda")


def test_download_offline_without_cache_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub.constants

    from companion.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    assert main(["download", "--model", "unsloth/csm-1b", "--revision", "main"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("error: unsloth/csm-1b (revision main) is not in the local cache")
    assert "unset HF_HUB_OFFLINE" in err


def test_download_of_a_local_checkpoint_checks_it(
    tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from companion.cli import main

    assert main(["download", "--model", str(tiny_model_dir)]) == 0
    assert "nothing to download" in capsys.readouterr().out

"""Model loading through from_pretrained: tiny model, local directories, devices, quantization."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gpu_core.runtime import (
    DEVICE_ENV,
    ModelLoadError,
    QuantizationUnavailableError,
    load_model,
    quantization_unsupported_reason,
    select_device,
)
from gpu_core.tiny import tiny_model_dir


def test_tiny_model_loads_with_right_padding_and_sdpa_attention() -> None:
    loaded = load_model("local/tiny-llama", device=torch.device("cpu"))
    assert loaded.source == str(tiny_model_dir())
    assert loaded.tokenizer.pad_token_id is not None
    assert loaded.tokenizer.padding_side == "right"
    assert loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id
    assert loaded.model.config._attn_implementation == "sdpa"
    assert not loaded.model.training
    assert next(loaded.model.parameters()).device.type == "cpu"


def test_local_directory_without_pad_token_falls_back_to_eos(tmp_path) -> None:
    source = load_model(str(tiny_model_dir()), device=torch.device("cpu"))
    source.tokenizer.pad_token = None
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device=torch.device("cpu"))
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id


def test_device_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert select_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where CUDA is absent")
def test_cuda_override_without_cuda_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with pytest.raises(ModelLoadError, match=DEVICE_ENV):
        select_device()


def test_unknown_model_id_names_it_without_network() -> None:
    """Offline (as on a worker without hub access) an unknown id fails at once, naming the id."""
    code = (
        "from gpu_core.runtime import load_model, ModelLoadError\n"
        "try:\n    load_model('nobody-here/no-such-model')\n"
        "except ModelLoadError as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPU_CORE_DEVICE": "cpu"}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    assert "cannot load model 'nobody-here/no-such-model'" in done.stdout


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_loading(quantization: str) -> None:
    device = select_device()
    reason = quantization_unsupported_reason(device)
    if reason is not None:
        pytest.skip(f"{quantization} loading not supported here: {reason}")
    loaded = load_model("local/tiny-llama", quantization, device)  # type: ignore[arg-type]
    import bitsandbytes as bnb

    quantized_type = bnb.nn.Linear4bit if quantization == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(module, quantized_type) for module in loaded.model.modules())


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantization_where_unsupported_names_it_and_the_reason(quantization: str) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(QuantizationUnavailableError) as caught:
        load_model("local/tiny-llama", quantization, cpu)  # type: ignore[arg-type]
    assert f"quantization '{quantization}'" in str(caught.value)
    assert "needs a CUDA device" in str(caught.value)

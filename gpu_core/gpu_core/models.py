"""Loading a tokenizer and causal LM through the ordinary transformers ``from_pretrained`` path.

``local/tiny-llama`` resolves to the directory :func:`gpu_core.tiny.tiny_model_dir` builds; any
other existing directory is loaded with ``local_files_only=True`` so it never touches the
network; anything else is treated as a hub id (``HF_HUB_OFFLINE`` is honoured by transformers).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpu_core.schemas import TINY_MODEL_ID, Quantization
from gpu_core.tiny import tiny_model_dir
from gpu_core.tiny_chat import TINY_CHAT_MODEL_ID, tiny_chat_model_dir

DEVICE_ENV = "GPU_CORE_DEVICE"


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message names the model id."""


class QuantizationUnavailableError(ModelLoadError):
    """The requested quantization cannot run here; the message says which and why."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    quantization: Quantization
    source: str


def select_device() -> torch.device:
    """``GPU_CORE_DEVICE`` (e.g. ``cpu``, ``cuda:1``) when set, else CUDA when available, else CPU."""
    configured = os.environ.get(DEVICE_ENV, "").strip()
    if configured:
        device = torch.device(configured)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"{DEVICE_ENV}={configured!r} but CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs that support it (the usual LLM training dtype), float32 otherwise."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_source(model_id: str) -> tuple[str, bool]:
    """(path or hub id, whether it is a local directory)."""
    if model_id == TINY_MODEL_ID:
        return str(tiny_model_dir()), True
    if model_id == TINY_CHAT_MODEL_ID:
        return str(tiny_chat_model_dir()), True
    path = Path(model_id).expanduser()
    if path.is_dir():
        return str(path), True
    return model_id, False


def quantization_config(quantization: Quantization, device: torch.device, dtype: torch.dtype) -> Any:
    """A ``BitsAndBytesConfig`` for 4-bit / 8-bit, or None; raises where bitsandbytes cannot run."""
    if quantization == "none":
        return None
    reason = quantization_unsupported_reason(device)
    if reason is not None:
        raise QuantizationUnavailableError(f"quantization {quantization!r} is not available: {reason}")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def quantization_unsupported_reason(device: torch.device) -> str | None:
    """Why bitsandbytes quantization cannot run on ``device``, or None when it can."""
    if device.type != "cuda":
        return f"bitsandbytes 4-bit/8-bit needs a CUDA device; this run uses {device.type}"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed (pip install 'gpu-core[quantization]')"
    return None


def load_model(
    model_id: str, quantization: Quantization = "none", device: torch.device | None = None
) -> LoadedModel:
    """Tokenizer (right padding, a pad token) and causal LM (eager attention) on ``device``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device if device is not None else select_device()
    dtype = compute_dtype(device)
    bnb_config = quantization_config(quantization, device, dtype)
    source, local = resolve_source(model_id)
    common: dict[str, Any] = {"local_files_only": True} if local else {}
    if not local and "@" in source:
        # A hub id pinned to a branch, tag or commit: "org/name@revision".
        source, revision = source.split("@", 1)
        common["revision"] = revision
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model_kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "eager", **common}
        if bnb_config is not None:
            # bitsandbytes places the weights itself; .to() is not allowed on a quantized model.
            model_kwargs.update(quantization_config=bnb_config, device_map={"": device.index or 0})
        model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as exc:
        where = "local directory" if local else "hub id (not a local directory)"
        raise ModelLoadError(f"cannot load model {model_id!r} as a {where}: {exc}") from exc
    if bnb_config is None:
        # transformers' @wraps(nn.Module.to) on PreTrainedModel.to hides its bound self from mypy
        model.to(device)  # type: ignore[arg-type]
    _ensure_pad_token(tokenizer, model, model_id)
    model.eval()
    return LoadedModel(model, tokenizer, device, dtype, quantization, source)


def _ensure_pad_token(tokenizer: Any, model: Any, model_id: str) -> None:
    """Right padding with labels -100 (see gpu_core.data); reuse eos/unk when there is no pad."""
    if tokenizer.pad_token_id is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ModelLoadError(f"model {model_id!r}: the tokenizer has no pad, eos or unk token")
        tokenizer.pad_token = fallback
    tokenizer.padding_side = "right"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def free_memory() -> None:
    """Collect garbage and return cached CUDA blocks, after the caller dropped its references."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

"""How a model is loaded and run: the one place every job kind (experiment, follow-up query,
counterfactual retraining) and every influence method goes through.

- **Device**: ``GPU_CORE_DEVICE`` when set, else CUDA when available, else CPU; the weights are
  loaded straight onto it (``device_map``), never on the CPU first.
- **Dtype**: bfloat16 only where the GPU runs it natively
  (``torch.cuda.is_bf16_supported(including_emulation=False)``), else float16 on a GPU, float32
  on the CPU. peft keeps the LoRA weights in float32 whatever the base dtype (its
  ``autocast_adapter_dtype``), and float16 training scales its loss (``training.train_lora``).
- **Attention**: ``sdpa``; ``eager`` only for an architecture whose attention softcaps its
  scores (Gemma 2), which ``sdpa`` cannot express. ``GPU_CORE_ATTENTION`` overrides it.
- **No KV cache** outside generation (``config.use_cache=False``; ``generate`` asks for one).
- **Quantization**: bitsandbytes 4-bit/8-bit with peft's k-bit preparation, done once per loaded
  model, before a new adapter is attached or a saved one is loaded, so an experiment, its
  queries and its retrainings run the same numerics.
- **LoRA targets**: only modules of the language model (:func:`lora_target_pattern`): an
  image-text model's vision tower is never adapted, since a text forward never runs it.
- **Gradient checkpointing** for training on a GPU (non-reentrant). Per-example gradient capture
  (``influence.gradients``) records each LoRA layer's output gradient in a tensor hook, which
  fires once per backward pass however often the forward is recomputed.
- **Loss at labelled positions only** (:func:`labelled_logits`): the LM head runs on the hidden
  states of the positions that predict a labelled token, so no ``[batch, seq, vocab]`` logits
  (let alone a float32 copy) exist; only ``[labelled tokens, vocab]``.
- **Batches sorted by length** (:func:`length_sorted_batches`): influence passes sort examples
  by length so a batch pads little, and return results in the original order.
- **Out of memory**: influence passes halve their micro-batch, as a token budget, and go on
  (:class:`MicroBatches`); training and evaluation stop with :class:`OutOfMemory`, a plain
  message naming the stage, the GPU, the memory the cost model expected and what to change.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gpu_core.schemas import TINY_MODEL_ID, Hyperparams, Quantization
from gpu_core.tiny import tiny_model_dir
from gpu_core.tiny_chat import TINY_CHAT_MODEL_ID, tiny_chat_model_dir

DEVICE_ENV = "GPU_CORE_DEVICE"
ATTENTION_ENV = "GPU_CORE_ATTENTION"
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
IGNORE_INDEX = -100
# Labelled rows whose float32 logits are formed at once when computing a loss without gradients.
LOGIT_CHUNK_ROWS = 1024


class ModelLoadError(RuntimeError):
    """The model or tokenizer could not be loaded; the message names the model id."""


class QuantizationUnavailableError(ModelLoadError):
    """The requested quantization cannot run here; the message says which and why."""


class LoraTargetError(ValueError):
    """No module of the language model matches ``hyperparams.target_modules``."""


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory in a stage that cannot shrink its batch on its own."""


@dataclass(frozen=True)
class RuntimeConfig:
    """How one model is run; chosen by :func:`runtime_config` from the device and the model."""

    device: torch.device
    dtype: torch.dtype  # the base weights' (and activations') dtype
    attention: str  # "sdpa" or "eager"
    quantization: Quantization
    gradient_checkpointing: bool  # during training


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    quantization: Quantization
    source: str
    config: RuntimeConfig
    # peft's k-bit preparation ran on this model (once per load, before any adapter).
    kbit_prepared: bool = False


def select_device() -> torch.device:
    """``GPU_CORE_DEVICE`` (e.g. ``cpu``, ``cuda:1``) when set, else CUDA when available, else CPU."""
    configured = os.environ.get(DEVICE_ENV, "").strip()
    if configured:
        device = torch.device(configured)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"{DEVICE_ENV}={configured!r} but CUDA is not available here")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bfloat16 in hardware (an A100, H100, L4...; not a T4 or V100,
    where torch would emulate it slowly)."""
    if device.type != "cuda":
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # a torch without the argument counts emulation: ask the hardware
        return torch.cuda.get_device_capability(device)[0] >= 8


def compute_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where native, float16 on other GPUs, float32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if native_bf16(device) else torch.float16


def _text_config(config: Any) -> Any:
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def attention_for(model_config: Any) -> str:
    """``GPU_CORE_ATTENTION`` when set, else ``eager`` for attention-score softcapping (which
    ``sdpa`` cannot apply), else ``sdpa``."""
    configured = os.environ.get(ATTENTION_ENV, "").strip()
    if configured:
        if configured not in ATTENTION_IMPLEMENTATIONS:
            raise ModelLoadError(
                f"{ATTENTION_ENV}={configured!r}; expected one of {ATTENTION_IMPLEMENTATIONS}"
            )
        return configured
    if getattr(_text_config(model_config), "attn_logit_softcapping", None):
        return "eager"
    return "sdpa"


def runtime_config(
    model_config: Any, quantization: Quantization, device: torch.device, attention: str | None = None
) -> RuntimeConfig:
    return RuntimeConfig(
        device=device,
        dtype=compute_dtype(device),
        attention=attention or attention_for(model_config),
        quantization=quantization,
        gradient_checkpointing=device.type == "cuda",
    )


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


# transformers' from_pretrained switches torch's weight initialisers off process-wide while it
# loads (and accelerate patches parameter registration), so a model created in another thread
# meanwhile (another load, a LoRA adapter) can keep uninitialised weights: wrong scores, NaN. Jobs
# run as threads of one process (compute-modal's in-process backend) create models one at a time.
MODEL_CREATION_LOCK = threading.Lock()


def load_model(
    model_id: str,
    quantization: Quantization = "none",
    device: torch.device | None = None,
    attention: str | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Tokenizer (right padding, a pad token) and causal LM on ``device``, in eval mode.
    ``dtype``: the weights' dtype instead of the device's compute dtype (a merge keeps the
    checkpoint's own)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = device if device is not None else select_device()
    source, local = resolve_source(model_id)
    common: dict[str, Any] = {"local_files_only": True} if local else {}
    if not local and "@" in source:
        # A hub id pinned to a branch, tag or commit: "org/name@revision".
        source, revision = source.split("@", 1)
        common["revision"] = revision
    try:
        model_config = AutoConfig.from_pretrained(source, **common)
        config = runtime_config(model_config, quantization, device, attention)
        if dtype is not None:
            config = dataclasses.replace(config, dtype=dtype)
        bnb_config = quantization_config(quantization, device, config.dtype)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model_kwargs: dict[str, Any] = {
            "dtype": config.dtype,
            "attn_implementation": config.attention,
            # Straight onto the device (bitsandbytes quantizes while placing).
            "device_map": {"": device},
            **common,
        }
        if bnb_config is not None:
            model_kwargs["quantization_config"] = bnb_config
        with MODEL_CREATION_LOCK:
            model = AutoModelForCausalLM.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError) as exc:
        where = "local directory" if local else "hub id (not a local directory)"
        raise ModelLoadError(f"cannot load model {model_id!r} as a {where}: {exc}") from exc
    _set_use_cache(model, False)
    _ensure_pad_token(tokenizer, model, model_id)
    model.eval()
    return LoadedModel(model, tokenizer, device, config.dtype, quantization, source, config)


def _set_use_cache(model: Any, value: bool) -> None:
    for config in {id(c): c for c in (model.config, _text_config(model.config))}.values():
        if hasattr(config, "use_cache"):
            config.use_cache = value


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


# ---- adapters --------------------------------------------------------------------------------


def _module_path(model: Any, module: Any) -> str | None:
    return next((name for name, candidate in model.named_modules() if candidate is module), None)


def language_model_prefix(model: Any) -> str:
    """The module path of ``model``'s text decoder ("" when the whole model is the decoder
    stack's parent, as for a plain causal LM): ``get_decoder()``, which an image-text model
    (Gemma 3, LLaVA...) answers with its language model."""
    getter = getattr(model, "get_decoder", None)
    decoder = getter() if callable(getter) else None
    if decoder is None or decoder is model:
        return ""
    path = _module_path(model, decoder)
    return path or ""


def lora_target_pattern(model: Any, target_modules: Sequence[str]) -> str:
    """A peft ``target_modules`` regex matching the linear layers named ``target_modules`` under
    the language model only. LoraTargetError naming the field when none matches."""
    prefix = language_model_prefix(model)
    names = "|".join(re.escape(name) for name in target_modules)
    scope = rf"{re.escape(prefix)}\.(?:.*\.)?" if prefix else r"(?:.*\.)?"
    pattern = rf"{scope}(?:{names})"
    matched = [
        name
        for name, module in model.named_modules()
        if re.fullmatch(pattern, name) and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]
    if not matched:
        leaves = sorted(
            {
                name.rsplit(".", 1)[-1]
                for name, module in model.named_modules()
                if name.startswith(prefix) and isinstance(module, torch.nn.Linear)
            }
        )
        raise LoraTargetError(
            f"hyperparams.target_modules: none of {list(target_modules)} names a linear layer of "
            f"this model's language model; its linear layers are named {', '.join(leaves[:12])}"
        )
    return pattern


def prepare_for_adapters(loaded: LoadedModel) -> None:
    """peft's k-bit preparation of a quantized base, once per load, before any adapter."""
    if loaded.quantization == "none" or loaded.kbit_prepared:
        return
    from peft import prepare_model_for_kbit_training

    loaded.model = prepare_model_for_kbit_training(
        loaded.model,
        use_gradient_checkpointing=loaded.config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    loaded.kbit_prepared = True


def attach_lora(loaded: LoadedModel, hyperparams: Hyperparams) -> Any:
    """A fresh peft LoRA adapter on ``loaded.model`` (the language model's target modules only);
    only the adapter parameters are trainable."""
    from peft import LoraConfig, get_peft_model

    prepare_for_adapters(loaded)
    config = LoraConfig(
        r=hyperparams.lora_r,
        lora_alpha=hyperparams.lora_alpha,  # type: ignore[arg-type]  # peft says int, scales by alpha / r
        lora_dropout=hyperparams.lora_dropout,
        target_modules=lora_target_pattern(loaded.model, hyperparams.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with MODEL_CREATION_LOCK:
        return get_peft_model(loaded.model, config)


def load_adapter(loaded: LoadedModel, adapter_dir: Path) -> Any:
    """A saved adapter (``save_pretrained``) on ``loaded.model``, prepared as for training."""
    from peft import PeftModel

    prepare_for_adapters(loaded)
    with MODEL_CREATION_LOCK:
        return PeftModel.from_pretrained(loaded.model, str(adapter_dir))


@contextlib.contextmanager
def gradient_checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """Activations recomputed in backward (non-reentrant) while inside, when ``enabled``."""
    if not enabled or not getattr(model, "supports_gradient_checkpointing", True):
        yield
        return
    kwargs = {"use_reentrant": False}
    # transformers 5 renamed gradient checkpointing to activation checkpointing.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        disable = model.activation_checkpointing_disable
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        disable = model.gradient_checkpointing_disable
    try:
        yield
    finally:
        disable()


# ---- forward passes --------------------------------------------------------------------------


def labelled_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, positions, targets) of the next-token predictions with a label: position ``t``
    of row ``b`` predicts ``labels[b, t + 1]``."""
    targets = labels[:, 1:]
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, positions, targets[rows, positions]


def labelled_logits(
    model: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits ``[N, vocab]`` in the model's dtype, targets ``[N]``, rows ``[N]``) for the ``N``
    labelled next-token predictions of ``batch``. A pre-hook on the LM head hands it only those
    positions' hidden states, so the model's own logit post-processing (softcapping, scaling)
    still applies and no full ``[batch, seq, vocab]`` logits are formed."""
    rows, positions, targets = labelled_positions(batch["labels"])
    head = model.get_output_embeddings()

    def gather(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (hidden[rows, positions].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    finally:
        handle.remove()
    return logits.reshape(-1, logits.shape[-1]), targets, rows


def mean_labelled_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's labelled tokens (the training loss)."""
    logits, targets, _ = labelled_logits(model, batch)
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)


@torch.no_grad()
def per_example_mean_losses(model: Any, batch: dict[str, torch.Tensor]) -> list[float]:
    """Mean cross-entropy over each example's labelled tokens (0 for an example with none),
    float32 logits formed :data:`LOGIT_CHUNK_ROWS` rows at a time."""
    logits, targets, rows = labelled_logits(model, batch)
    n = batch["labels"].shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=logits.device)
    for start in range(0, targets.numel(), LOGIT_CHUNK_ROWS):
        chunk = slice(start, start + LOGIT_CHUNK_ROWS)
        losses = F.cross_entropy(logits[chunk].float(), targets[chunk], reduction="none")
        sums.index_add_(0, rows[chunk], losses)
    counts = torch.bincount(rows, minlength=n).clamp(min=1).to(sums)
    return (sums / counts).tolist()


# ---- batching and memory ---------------------------------------------------------------------


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of at most ``batch_size`` examples of similar length, longest first
    (little padding); callers put results back at these indices (the original order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


# Where a model remembers the token budget its influence passes fell back to (the same GPU).
_TOKEN_BUDGET_ATTRIBUTE = "_gpu_core_token_budget"


class MicroBatches:
    """The micro-batches of an influence pass over ``model``: at most ``batch_size`` examples
    each; once one runs out of GPU memory, also at most a token budget (examples x the longest
    one's length), half the tokens of the micro-batch that failed. The budget is remembered on
    the model for the passes after it, and because it counts tokens, batches of shorter examples
    stay larger than those of the longest."""

    def __init__(self, model: Any, batch_size: int) -> None:
        self.model = model
        self.batch_size = batch_size
        self.token_budget: int | None = getattr(model, _TOKEN_BUDGET_ATTRIBUTE, None)

    def _end(self, lengths: Sequence[int], start: int) -> int:
        end, longest = start + 1, lengths[start]
        while end < len(lengths) and end - start < self.batch_size:
            wider = max(longest, lengths[end])
            if self.token_budget is not None and (end - start + 1) * wider > self.token_budget:
                break
            end, longest = end + 1, wider
        return end

    def run(
        self, items: Sequence[Any], lengths: Sequence[int], work: Callable[[Sequence[Any]], torch.Tensor]
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset into items, work(micro-batch))`` over ``items`` in order (``lengths``: each
        item's tokens); an out-of-memory sets or halves the token budget and retries (a single
        example that does not fit raises :class:`OutOfMemory`)."""
        start = 0
        while start < len(items):
            end = self._end(lengths, start)
            result: torch.Tensor | None = None
            try:
                result = work(items[start:end])
            except torch.cuda.OutOfMemoryError as exc:
                if end - start == 1:
                    raise OutOfMemory(
                        f"influence: one example does not fit in the memory of {device_description()}; "
                        "lower hyperparams.max_seq_len, use quantization '4bit', or choose a larger GPU"
                    ) from exc
            if result is None:
                # Outside the except block, so the failed pass's frames (and tensors) are gone.
                free_memory()
                failed_tokens = (end - start) * max(lengths[start:end])
                self.token_budget = max(1, failed_tokens // 2)
                setattr(self.model, _TOKEN_BUDGET_ATTRIBUTE, self.token_budget)
                continue
            yield start, result
            start = end


def device_description(device: torch.device | None = None) -> str:
    """The GPU's name and memory ("the CPU" without one)."""
    if device is not None and device.type != "cuda":
        return "the CPU"
    if not torch.cuda.is_available():
        return "the CPU"
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return f"{properties.name} ({properties.total_memory / 1e9:.0f} GB)"


def out_of_memory_message(stage: str, device: torch.device, expected_gb: float | None) -> str:
    """A plain message for a stage that ran out of GPU memory: where, on what, what was
    expected, and what to change."""
    expected = (
        f"the cost model expected {expected_gb:.1f} GB"
        if expected_gb is not None
        else "the cost model's estimate is not available here"
    )
    return (
        f"{stage}: out of GPU memory on {device_description(device)} ({expected}). "
        "Lower hyperparams.batch_size or hyperparams.max_seq_len, use quantization '4bit', "
        "or choose a GPU with more memory."
    )


@contextlib.contextmanager
def stage_memory(stage: str, device: torch.device, expected_gb: Callable[[], float | None]) -> Iterator[None]:
    """Turns an out-of-memory inside into :class:`OutOfMemory` with :func:`out_of_memory_message`."""
    try:
        yield
    except torch.cuda.OutOfMemoryError as exc:
        free_memory()
        raise OutOfMemory(out_of_memory_message(stage, device, expected_gb())) from exc

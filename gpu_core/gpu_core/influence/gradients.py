"""Per-example gradients of the LoRA weight matrices from one batched forward+backward pass.

Every method scores with one loss: the **summed** next-token cross-entropy over the completion
tokens of an example (labels -100 on prompt and padding are ignored). For a linear layer the
per-example weight gradient is ``sum_t delta_t a_t^T`` (``a_t`` its input, ``delta_t`` the
gradient of the loss w.r.t. its output); forward hooks capture ``a_t`` and the outputs, one
``torch.autograd.grad`` over the batch's summed loss gives every ``delta_t`` (examples do not
interact, so the gradient of the batch sum w.r.t. example b's activations is example b's own),
and an einsum per layer forms the per-example gradients, as kronfluence's hooks do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpu_core.data import IGNORE_INDEX, EncodedPair, collate

_LORA_MATRICES = ("lora_A", "lora_B")


@dataclass(frozen=True)
class LoraLayer:
    """One LoRA weight matrix (``lora_A`` or ``lora_B`` of one adapted module)."""

    module_name: str  # name in model.named_modules()
    param_name: str  # name of its weight in model.named_parameters()
    module: nn.Linear

    @property
    def numel(self) -> int:
        return self.module.weight.numel()


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """The active adapter's lora_A / lora_B ``nn.Linear`` modules, in model order."""
    active = getattr(model, "active_adapters", None)
    active_names = set(active() if callable(active) else active or [])
    layers = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if type(module) is not nn.Linear or len(parts) < 2 or parts[-2] not in _LORA_MATRICES:
            continue
        if active_names and parts[-1] not in active_names:
            continue
        layers.append(LoraLayer(module_name=name, param_name=f"{name}.weight", module=module))
    if not layers:
        raise ValueError("the model has no LoRA lora_A/lora_B linear layers to score influence on")
    return layers


def layer_slices(layers: Sequence[LoraLayer]) -> list[slice]:
    """Where each layer's flattened gradient sits in the concatenated per-example gradient."""
    slices, start = [], 0
    for layer in layers:
        slices.append(slice(start, start + layer.numel))
        start += layer.numel
    return slices


def summed_completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over labelled (completion) tokens of the whole batch."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def collate_to(pairs: Sequence[EncodedPair], pad_token_id: int, device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) for key, value in collate(pairs, pad_token_id).items()}


@contextlib.contextmanager
def lora_grad_enabled(layers: Sequence[LoraLayer]) -> Iterator[None]:
    """LoRA weights require grad inside (an adapter loaded for inference may not), as before after."""
    previous = [layer.module.weight.requires_grad for layer in layers]
    try:
        for layer in layers:
            layer.module.weight.requires_grad_(True)
        yield
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.module.weight.requires_grad_(flag)


def lora_state(layers: Sequence[LoraLayer]) -> dict[str, torch.Tensor]:
    return {layer.param_name: layer.module.weight.detach().clone() for layer in layers}


def load_lora_state(layers: Sequence[LoraLayer], state: Mapping[str, torch.Tensor]) -> None:
    missing = [layer.param_name for layer in layers if layer.param_name not in state]
    if missing:
        raise ValueError(f"adapter checkpoint lacks LoRA parameters: {', '.join(missing[:3])}")
    with torch.no_grad():
        for layer in layers:
            layer.module.weight.copy_(state[layer.param_name])


def per_example_gradients(
    model: nn.Module, layers: Sequence[LoraLayer], batch: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """``[batch, sum of layer sizes]``: each example's gradient of its summed completion loss
    w.r.t. every LoRA weight matrix, flattened and concatenated in ``layers`` order.

    Needs ``lora_grad_enabled(layers)`` so the LoRA outputs are part of the autograd graph."""
    inputs: dict[int, torch.Tensor] = {}
    outputs: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if index in outputs:
                raise RuntimeError(f"{layers[index].module_name} ran twice in one forward pass")
            inputs[index] = args[0].detach()
            outputs[index] = output

        return hook

    handles = [layer.module.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            # No KV cache: nothing is generated, and a cache per batch is garbage in reference
            # cycles that accumulates until the collector runs.
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits
            loss = summed_completion_loss(logits, batch["labels"])
    finally:
        for handle in handles:
            handle.remove()
    if len(outputs) != len(layers):
        raise RuntimeError("not every LoRA layer took part in the forward pass")
    output_grads = torch.autograd.grad(loss, [outputs[i] for i in range(len(layers))])
    # Padding carries no loss, so its output gradient is already zero; the mask makes that
    # independent of the attention implementation.
    mask = batch["attention_mask"].to(inputs[0].dtype).unsqueeze(-1)
    grads = [
        torch.einsum("bto,bti->boi", output_grads[i], inputs[i] * mask).flatten(start_dim=1)
        for i in range(len(layers))
    ]
    return torch.cat(grads, dim=1)


def batched_gradients(
    model: nn.Module,
    layers: Sequence[LoraLayer],
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    batch_size: int,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields ``(start index, per-example gradients)`` batch by batch."""
    device = model_device(model)
    for start in range(0, len(pairs), batch_size):
        batch = collate_to(pairs[start : start + batch_size], pad_token_id, device)
        yield start, per_example_gradients(model, layers, batch)


def stacked_gradients(
    model: nn.Module,
    layers: Sequence[LoraLayer],
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    batch_size: int,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """``[len(pairs), width]``: every example's per-example gradients in one tensor (the
    model's device and dtype), batch by batch; ``progress`` gets the fraction done."""
    stacked: torch.Tensor | None = None
    with lora_grad_enabled(layers):
        for start, grads in batched_gradients(model, layers, pairs, pad_token_id, batch_size):
            if stacked is None:
                stacked = grads.new_empty(len(pairs), grads.shape[1])
            stacked[start : start + grads.shape[0]] = grads.detach()
            if progress is not None:
                progress((start + grads.shape[0]) / len(pairs))
    if stacked is None:
        raise ValueError("no examples to take gradients of")
    return stacked

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
from gpu_core.runtime import MicroBatches, labelled_logits, length_sorted_batches

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
    """Summed next-token cross-entropy over labelled (completion) tokens of the whole batch, from
    full ``[batch, seq, vocab]`` logits (``gpu_core.runtime.labelled_logits`` forms only the
    labelled positions' logits)."""
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


@contextlib.contextmanager
def lora_state_restored(layers: Sequence[LoraLayer]) -> Iterator[None]:
    """The LoRA weights as they are on entering, put back on leaving (a pass that loads
    checkpoint states in turn leaves the final adapter in place)."""
    saved = lora_state(layers)
    try:
        yield
    finally:
        load_lora_state(layers, saved)


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
    """``[batch, sum of layer sizes]``: see :func:`per_example_gradients_and_losses`."""
    return per_example_gradients_and_losses(model, layers, batch)[0]


def per_example_gradients_and_losses(
    model: nn.Module, layers: Sequence[LoraLayer], batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[batch, sum of layer sizes]``, ``[batch]``): each example's gradient of its summed completion loss
    w.r.t. every LoRA weight matrix, flattened and concatenated in ``layers`` order.

    A forward hook keeps each LoRA layer's input and puts a tensor hook on its output; the
    tensor hook receives the output's gradient during the backward pass and forms the layer's
    per-example gradients there (freeing the input). Under gradient checkpointing the forward
    runs again inside backward: the recomputed input holds the same values, and the gradient
    still reaches the output once, so the capture stays exact. The second tensor is each
    example's mean loss over its labelled tokens (float32, 0 for none), from the same forward.

    Needs ``lora_grad_enabled(layers)`` so the LoRA outputs are part of the autograd graph."""
    inputs: dict[int, torch.Tensor] = {}
    grads: dict[int, torch.Tensor] = {}
    # Padding carries no loss, so its output gradient is already zero; the mask makes that
    # independent of the attention implementation.
    mask = batch["attention_mask"].unsqueeze(-1)

    def capture(index: int):
        def on_output_grad(output_grad: torch.Tensor) -> None:
            if index in grads:
                raise RuntimeError(f"{layers[index].module_name} ran twice in one forward pass")
            layer_input = inputs.pop(index)
            grads[index] = torch.einsum(
                "bto,bti->boi", output_grad, layer_input * mask.to(layer_input.dtype)
            ).flatten(start_dim=1)

        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if not output.requires_grad:  # a forward without autograd (nothing to capture)
                return
            inputs[index] = args[0].detach()
            output.register_hook(on_output_grad)

        return hook

    handles = [layer.module.register_forward_hook(capture(i)) for i, layer in enumerate(layers)]
    try:
        with torch.enable_grad():
            logits, targets, rows = labelled_logits(model, dict(batch))
            token_losses = F.cross_entropy(logits.float(), targets, reduction="none")
            loss = token_losses.sum()
            if len(inputs) != len(layers):
                raise RuntimeError("not every LoRA layer took part in the forward pass")
            torch.autograd.grad(loss, [layer.module.weight for layer in layers], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if len(grads) != len(layers):
        raise RuntimeError("not every LoRA layer received a gradient in the backward pass")
    n = batch["labels"].shape[0]
    sums = torch.zeros(n, dtype=torch.float32, device=token_losses.device)
    sums.index_add_(0, rows, token_losses.detach())
    counts = torch.bincount(rows, minlength=n).clamp(min=1).to(sums)
    return torch.cat([grads[i] for i in range(len(layers))], dim=1), sums / counts


# Called with (indices into the training pairs, their per-example gradients, their mean losses)
# for every micro-batch of a pass: lets the training-set summary reuse a method's gradient pass
# at the final adapter instead of running its own (gpu_core.training_summary).
GradientTap = Callable[[Sequence[int], torch.Tensor, torch.Tensor], None]


def _tapped_gradients(
    model: nn.Module,
    layers: Sequence[LoraLayer],
    pairs: Sequence[EncodedPair],
    chunk: Sequence[int],
    pad_token_id: int,
    device: torch.device,
    tap: GradientTap | None,
) -> torch.Tensor:
    batch = collate_to([pairs[i] for i in chunk], pad_token_id, device)
    if tap is None:
        return per_example_gradients(model, layers, batch)
    grads, losses = per_example_gradients_and_losses(model, layers, batch)
    tap(chunk, grads, losses)
    return grads


def batched_gradients(
    model: nn.Module,
    layers: Sequence[LoraLayer],
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    batch_size: int,
    tap: GradientTap | None = None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yields ``(start index, per-example gradients)`` micro-batch by micro-batch, in order; a
    micro-batch that runs out of GPU memory is halved, as a token budget, for this and later
    passes on ``model`` (``gpu_core.runtime.MicroBatches``), and retried. ``tap`` sees every
    micro-batch once, with its losses."""
    device = model_device(model)
    micro = MicroBatches(model, batch_size)
    yield from micro.run(
        list(range(len(pairs))),
        [len(pair.input_ids) for pair in pairs],
        lambda chunk: _tapped_gradients(model, layers, pairs, chunk, pad_token_id, device, tap),
    )


def sorted_gradients(
    model: nn.Module,
    layers: Sequence[LoraLayer],
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    batch_size: int,
    tap: GradientTap | None = None,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yields ``(indices into pairs, per-example gradients)`` over batches of similar length
    (:func:`gpu_core.runtime.length_sorted_batches`, so little padding); callers put each row
    back at its index. Out-of-memory halving and ``tap`` as :func:`batched_gradients`."""
    device = model_device(model)
    micro = MicroBatches(model, batch_size)
    lengths = [len(pair.input_ids) for pair in pairs]
    for indices in length_sorted_batches(lengths, batch_size):

        def work(chunk: Sequence[int]) -> torch.Tensor:
            return _tapped_gradients(model, layers, pairs, chunk, pad_token_id, device, tap)

        for offset, grads in micro.run(indices, [lengths[i] for i in indices], work):
            yield indices[offset : offset + grads.shape[0]], grads


def stacked_gradients(
    model: nn.Module,
    layers: Sequence[LoraLayer],
    pairs: Sequence[EncodedPair],
    pad_token_id: int,
    batch_size: int,
    progress: Callable[[float], None] | None = None,
) -> torch.Tensor:
    """``[len(pairs), width]``: every example's per-example gradients in one tensor (the
    model's device and dtype), in the order of ``pairs``, computed in length-sorted batches;
    ``progress`` gets the fraction done."""
    stacked: torch.Tensor | None = None
    done = 0
    with lora_grad_enabled(layers):
        for indices, grads in sorted_gradients(model, layers, pairs, pad_token_id, batch_size):
            if stacked is None:
                stacked = grads.new_empty(len(pairs), grads.shape[1])
            stacked[torch.tensor(indices, device=stacked.device)] = grads.detach()
            done += len(indices)
            if progress is not None:
                progress(done / len(pairs))
    if stacked is None:
        raise ValueError("no examples to take gradients of")
    return stacked

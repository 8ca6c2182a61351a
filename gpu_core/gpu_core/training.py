"""LoRA fine-tuning: peft adapters, loss on completion tokens only, seeded, one checkpoint per epoch.

Reproducibility: the caller seeds torch before ``gpu_core.runtime.attach_lora`` (LoRA A matrices
are random),
and the data order of epoch ``e`` is a permutation drawn from a generator seeded with
``seed + e``, so the same spec and seed give the same losses on the same hardware.

Optimiser: AdamW (no weight decay: the adapters are small and start at zero change), a linear
warm-up over the first 10% of steps then linear decay towards zero (every step has a non-zero
rate, so no step is wasted), gradient norm clipped at 1.0. The loss is the mean cross-entropy
over the batch's labelled tokens, formed at those positions only
(``gpu_core.runtime.mean_labelled_loss``). A float16 base (a GPU without native bfloat16) trains
with a scaled loss so small gradients do not underflow; ``gradient_checkpointing`` recomputes
activations in backward (the runtime turns it on on GPUs).

TracIn checkpoints: the trainable parameters at the end of each epoch, weighted by the **mean
learning rate over that epoch's steps** (as LESS does), since TracInCP approximates the sum over
all steps of lr_t * <grad train, grad eval> by one checkpoint per epoch. Each checkpoint also
keeps AdamW's bias-corrected second moment of every trainable parameter, for TrackStar.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpu_core.data import EncodedPair, collate
from gpu_core.influence import AdapterCheckpoint
from gpu_core.runtime import gradient_checkpointing as checkpointing
from gpu_core.runtime import mean_labelled_loss
from gpu_core.schemas import Hyperparams, LossPoint

WARMUP_FRACTION = 0.1
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TrainingStep:
    """One optimiser step, reported as it finishes (epoch and step are 1-based)."""

    epoch: int
    total_epochs: int
    step: int
    total_steps: int
    loss: float
    learning_rate: float
    eta_s: float


@dataclass
class TrainingOutcome:
    loss_curve: list[LossPoint]
    checkpoints: list[AdapterCheckpoint]


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Detached clones of the trainable parameters, by ``named_parameters()`` name."""
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def adam_second_moments(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """``exp_avg_sq / (1 - beta2^step)`` per trainable parameter name, as Adam's update uses it."""
    beta2 = optimizer.param_groups[0]["betas"][1]
    moments = {}
    for name, parameter in model.named_parameters():
        state = optimizer.state.get(parameter, {})
        if parameter.requires_grad and "exp_avg_sq" in state:
            step = float(state["step"])
            moments[name] = state["exp_avg_sq"].detach().clone() / (1 - beta2**step)
    return moments


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The data order of ``epoch`` (1-based): a permutation fixed by the seed and the epoch."""
    generator = torch.Generator().manual_seed(seed + epoch)
    return torch.randperm(n_examples, generator=generator).tolist()


def lr_factor(total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at 0-based step ``s``: warm-up then linear decay."""
    warmup = int(WARMUP_FRACTION * total_steps)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(total_steps - s, 1) / (total_steps - warmup)

    return factor


def train_lora(
    model: Any,
    train_pairs: Sequence[EncodedPair],
    hyperparams: Hyperparams,
    pad_token_id: int,
    device: torch.device,
    on_step: Callable[[TrainingStep], None] | None = None,
    gradient_checkpointing: bool = False,
) -> TrainingOutcome:
    """Train the LoRA parameters of ``model`` in place; the model is left in eval mode."""
    if not train_pairs:
        raise ValueError("training_data: needs at least one training example")
    batch_size = hyperparams.batch_size
    steps_per_epoch = math.ceil(len(train_pairs) / batch_size)
    total_steps = steps_per_epoch * hyperparams.epochs
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=hyperparams.learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(total_steps))
    loss_curve: list[LossPoint] = []
    checkpoints: list[AdapterCheckpoint] = []
    # Loss scaling only where the base runs in float16 (bfloat16 and float32 have float32's range).
    half = any(p.dtype == torch.float16 for p in model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=half and device.type == "cuda")
    started = time.monotonic()
    step = 0
    model.train()
    try:
        with checkpointing(model, gradient_checkpointing):
            for epoch in range(1, hyperparams.epochs + 1):
                order = epoch_order(len(train_pairs), hyperparams.seed, epoch)
                epoch_lrs: list[float] = []
                for start in range(0, len(order), batch_size):
                    batch = collate([train_pairs[i] for i in order[start : start + batch_size]], pad_token_id)
                    batch = {key: value.to(device) for key, value in batch.items()}
                    learning_rate = float(scheduler.get_last_lr()[0])
                    loss = mean_labelled_loss(model, batch)
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    epoch_lrs.append(learning_rate)
                    loss_value = float(loss.detach())
                    loss_curve.append(
                        LossPoint(
                            step=step,
                            epoch=(epoch - 1) + len(epoch_lrs) / steps_per_epoch,
                            loss=loss_value,
                            learning_rate=learning_rate,
                        )
                    )
                    if on_step is not None:
                        elapsed = time.monotonic() - started
                        on_step(
                            TrainingStep(
                                epoch=epoch,
                                total_epochs=hyperparams.epochs,
                                step=step,
                                total_steps=total_steps,
                                loss=loss_value,
                                learning_rate=learning_rate,
                                eta_s=elapsed / step * (total_steps - step),
                            )
                        )
                checkpoints.append(
                    AdapterCheckpoint(
                        state=trainable_state(model),
                        learning_rate=sum(epoch_lrs) / len(epoch_lrs),
                        epoch=epoch,
                        second_moment=adam_second_moments(model, optimizer),
                    )
                )
    finally:
        model.eval()
        optimizer.zero_grad(set_to_none=True)
    return TrainingOutcome(loss_curve=loss_curve, checkpoints=checkpoints)

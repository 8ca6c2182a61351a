"""TracInCP: ``sum_c lr_c <grad_c(train), grad_c(query)>`` over adapter checkpoints.

Per checkpoint the query gradients are computed once and cached (``[n_queries, d]``); training
batches (sorted by length, scored back into their columns) then stream against them, so memory
is bounded by the cached queries plus one batch, whatever the number of training examples (the
``[n_queries, n_train]`` result aside).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gpu_core.data import EncodedPair
from gpu_core.influence.gradients import (
    GradientTap,
    load_lora_state,
    lora_grad_enabled,
    lora_layers,
    lora_state_restored,
    sorted_gradients,
    stacked_gradients,
)


def tracin_scores(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    queries: Sequence[EncodedPair],
    checkpoints: Sequence[tuple[dict[str, torch.Tensor], float]],
    batch_size: int,
    progress: Callable[[float], None],
    final_tap: GradientTap | None = None,
) -> torch.Tensor:
    """``[n_queries, n_train]`` float64; ``checkpoints`` are (LoRA state, learning rate), the
    last one the final adapter; ``final_tap`` sees the training gradients at that one."""
    layers = lora_layers(model)
    scores = torch.zeros(len(queries), len(train), dtype=torch.float64)
    # Progress in examples: the queries and the training set, once per checkpoint.
    total = (len(queries) + len(train)) * len(checkpoints)
    done = 0
    with lora_state_restored(layers), lora_grad_enabled(layers):
        for number, (state, learning_rate) in enumerate(checkpoints, start=1):
            load_lora_state(layers, state)
            tap = final_tap if number == len(checkpoints) else None
            query_grads = stacked_gradients(model, layers, queries, pad_token_id, batch_size)
            done += len(queries)
            progress(done / total)
            for indices, train_grads in sorted_gradients(model, layers, train, pad_token_id, batch_size, tap):
                block = (query_grads @ train_grads.T).to(device="cpu", dtype=torch.float64)
                scores[:, indices] += learning_rate * block
                done += len(indices)
                progress(done / total)
            del query_grads
    return scores

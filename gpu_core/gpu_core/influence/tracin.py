"""TracInCP: ``sum_c lr_c <grad_c(train), grad_c(query)>`` over adapter checkpoints.

Per checkpoint the query gradients are computed once and cached (``[n_queries, d]``); training
batches then stream against them, so memory is bounded by the cached queries plus one batch,
whatever the number of training examples (the ``[n_queries, n_train]`` result aside).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gpu_core.data import EncodedPair
from gpu_core.influence.gradients import (
    batched_gradients,
    load_lora_state,
    lora_grad_enabled,
    lora_layers,
    lora_state,
)


def tracin_scores(
    model: nn.Module,
    pad_token_id: int,
    train: Sequence[EncodedPair],
    queries: Sequence[EncodedPair],
    checkpoints: Sequence[tuple[dict[str, torch.Tensor], float]],
    batch_size: int,
    progress: Callable[[float], None],
) -> torch.Tensor:
    """``[n_queries, n_train]`` float64; ``checkpoints`` are (LoRA state, learning rate)."""
    layers = lora_layers(model)
    final_state = lora_state(layers)
    scores = torch.zeros(len(queries), len(train), dtype=torch.float64)
    batches_per_checkpoint = -(-len(queries) // batch_size) + -(-len(train) // batch_size)
    done = 0
    try:
        with lora_grad_enabled(layers):
            for state, learning_rate in checkpoints:
                load_lora_state(layers, state)
                query_grads = torch.cat(
                    [g for _, g in batched_gradients(model, layers, queries, pad_token_id, batch_size)]
                )
                done += -(-len(queries) // batch_size)
                progress(done / (batches_per_checkpoint * len(checkpoints)))
                for start, train_grads in batched_gradients(model, layers, train, pad_token_id, batch_size):
                    block = (query_grads @ train_grads.T).to(device="cpu", dtype=torch.float64)
                    scores[:, start : start + train_grads.shape[0]] += learning_rate * block
                    done += 1
                    progress(done / (batches_per_checkpoint * len(checkpoints)))
                del query_grads
    finally:
        load_lora_state(layers, final_state)
    return scores

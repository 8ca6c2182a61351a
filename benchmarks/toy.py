"""A deterministic toy LoRA setup on ``local/tiny-llama`` for the influence tests and benchmark:
random letter-string pairs, a peft LoRA model trained for a few AdamW steps per "epoch", and one
adapter checkpoint per epoch with its learning rate."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gpu_core.data import EncodedPair, collate, encode_pair
from gpu_core.influence import AdapterCheckpoint
from gpu_core.influence.gradients import lora_layers, lora_state, summed_completion_loss
from gpu_core.tiny import tiny_model_dir
from gpu_core.training import adam_second_moments


@dataclass
class ToySetup:
    model: Any  # peft model, eval mode, final adapter
    tokenizer: Any
    train: list[EncodedPair]
    queries: list[EncodedPair]
    checkpoints: list[AdapterCheckpoint]


def random_pairs(count: int, seed: int, max_seq_len: int = 64) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    letters = string.ascii_lowercase
    return [
        (
            "".join(rng.choices(letters, k=rng.randint(4, 12))) + ":",
            "".join(rng.choices(letters, k=rng.randint(3, 10))),
        )
        for _ in range(count)
    ]


def load_tiny(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = tiny_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    # transformers' @wraps(nn.Module.to) on PreTrainedModel.to hides its bound self from mypy
    return model.to(dtype), tokenizer  # type: ignore[arg-type]


def build_toy_setup(
    n_train: int,
    n_queries: int,
    *,
    dtype: torch.dtype = torch.float32,
    lora_r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    epochs: int = 3,
    steps_per_epoch: int = 4,
    learning_rate: float = 2e-2,
    duplicate_queries: bool = False,
    seed: int = 0,
) -> ToySetup:
    """``duplicate_queries``: each query is an exact copy of training example ``i * n_train //
    n_queries`` (planted duplicates); otherwise queries are fresh random pairs."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = load_tiny(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_peft_model(
            base,
            LoraConfig(
                r=lora_r,
                lora_alpha=2 * lora_r,
                lora_dropout=0.0,
                target_modules=list(target_modules),
                task_type="CAUSAL_LM",
            ),
        )
        texts = random_pairs(n_train + n_queries, seed)
        train = [encode_pair(tokenizer, p, c, 64) for p, c in texts[:n_train]]
        if duplicate_queries:
            queries = [train[i * n_train // n_queries] for i in range(n_queries)]
        else:
            queries = [encode_pair(tokenizer, p, c, 64) for p, c in texts[n_train:]]
        checkpoints = _train(model, tokenizer, train, epochs, steps_per_epoch, learning_rate, seed)
    model.eval()
    return ToySetup(model, tokenizer, train, queries, checkpoints)


def _train(
    model: Any,
    tokenizer: Any,
    train: Sequence[EncodedPair],
    epochs: int,
    steps_per_epoch: int,
    learning_rate: float,
    seed: int,
) -> list[AdapterCheckpoint]:
    layers = lora_layers(model)
    optimizer = torch.optim.AdamW([layer.module.weight for layer in layers], lr=learning_rate)
    total_steps = epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    rng = random.Random(seed)
    checkpoints = []
    model.train()
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            batch = collate(rng.sample(list(train), min(16, len(train))), tokenizer.pad_token_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = summed_completion_loss(logits, batch["labels"]) / (batch["labels"] != -100).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        # TracIn weighs a checkpoint by the learning rate used in the epoch that produced it.
        checkpoints.append(
            AdapterCheckpoint(
                lora_state(layers),
                learning_rate * (1 - epoch / epochs),
                epoch + 1,
                second_moment=adam_second_moments(model, optimizer),
            )
        )
    return checkpoints

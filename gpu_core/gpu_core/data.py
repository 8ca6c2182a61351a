"""Tokenisation shared by training, evaluation and influence.

A pair (prompt, target) becomes ``bos + prompt + target + eos`` with labels -100 on the prompt
(loss on target tokens only). Batches are right-padded with labels -100 on padding, so under a
causal mask the padded positions never affect the real ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedPair:
    input_ids: list[int]
    labels: list[int]


def encode_pair(tokenizer: Any, prompt: str, target: str, max_seq_len: int) -> EncodedPair:
    """Tokenise; when too long, drop prompt tokens from the left first (keeping the most recent
    context), then target tokens from the right."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    budget = max_seq_len - len(prefix)
    target_ids = target_ids[: max(budget - 1, 1)]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - (budget - len(target_ids))):]
    input_ids = prefix + prompt_ids + target_ids
    labels = [IGNORE_INDEX] * (len(prefix) + len(prompt_ids)) + target_ids
    return EncodedPair(input_ids=input_ids, labels=labels)


def collate(pairs: Sequence[EncodedPair], pad_token_id: int) -> dict[str, Any]:
    """Right-pad to the longest sequence; returns torch tensors input_ids, labels, attention_mask."""
    import torch

    length = max(len(p.input_ids) for p in pairs)
    input_ids = torch.full((len(pairs), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), length), dtype=torch.long)
    for row, pair in enumerate(pairs):
        n = len(pair.input_ids)
        input_ids[row, :n] = torch.tensor(pair.input_ids)
        labels[row, :n] = torch.tensor(pair.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batches(items: Sequence[Any], batch_size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), batch_size):
        yield items[start : start + batch_size]

"""Evaluation: greedy generation, exact match and the loss of the expected answer.

Per eval example: the generated output (greedy, at most ``max_new_tokens``, stopping at eos),
exact match of the stripped output against the stripped ``expected``, and the mean per-token
cross-entropy of ``expected`` + eos given ``bos + prompt`` (the same tokenisation as training,
:func:`gpu_core.data.encode_pair`). Generation is batched with left padding; the loss uses the
right-padded batches of :func:`gpu_core.data.collate`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpu_core.data import IGNORE_INDEX, EncodedPair, batches, collate, encode_pair
from gpu_core.schemas import EvalExample, EvalMetrics, EvalRun, ExampleOutcome, TrainingExample


def few_shot_prefix(training_data: Sequence[TrainingExample], k: int, seed: int) -> str:
    """``k`` training examples (chosen by ``seed``) as ``prompt+completion`` blocks, one per line,
    ending with a newline so the eval prompt starts its own block; empty when ``k`` is 0."""
    if k <= 0 or not training_data:
        return ""
    chosen = random.Random(seed).sample(range(len(training_data)), min(k, len(training_data)))
    return "".join(
        f"{training_data[i].prompt}{training_data[i].completion}\n" for i in sorted(chosen)
    )


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[EvalExample],
    device: torch.device,
    max_seq_len: int,
    max_new_tokens: int,
    batch_size: int,
    prompt_prefix: str = "",
    on_progress: Callable[[float], None] | None = None,
) -> EvalRun:
    """Evaluate ``model`` on ``examples``, each prompt preceded by ``prompt_prefix``."""
    model.eval()
    outcomes: list[ExampleOutcome] = []
    for chunk in batches(examples, batch_size):
        prompts = [prompt_prefix + example.prompt for example in chunk]
        outputs = generate(model, tokenizer, prompts, device, max_seq_len, max_new_tokens)
        pairs = [
            encode_pair(tokenizer, prompt, example.expected, max_seq_len)
            for prompt, example in zip(prompts, chunk, strict=True)
        ]
        losses = target_losses(model, pairs, tokenizer.pad_token_id, device)
        for example, output, loss in zip(chunk, outputs, losses, strict=True):
            outcomes.append(
                ExampleOutcome(
                    id=example.id or "",
                    output=output,
                    exact_match=output.strip() == example.expected.strip(),
                    loss=loss,
                )
            )
        if on_progress is not None:
            on_progress(len(outcomes) / len(examples))
    n = len(outcomes)
    metrics = EvalMetrics(
        exact_match_rate=sum(o.exact_match for o in outcomes) / n if n else 0.0,
        mean_loss=sum(o.loss for o in outcomes) / n if n else 0.0,
        n=n,
    )
    return EvalRun(metrics=metrics, examples=outcomes)


@torch.no_grad()
def target_losses(
    model: Any, pairs: Sequence[EncodedPair], pad_token_id: int, device: torch.device
) -> list[float]:
    """Mean per-token cross-entropy over the labelled (target) tokens of each pair."""
    batch = {key: value.to(device) for key, value in collate(pairs, pad_token_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    mask = (labels != IGNORE_INDEX).float()
    per_example = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return per_example.tolist()


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    device: torch.device,
    max_seq_len: int,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of ``bos + prompt`` (left-padded batch), decoded without specials."""
    prefix = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    # Keep the most recent prompt tokens so prompt + answer fit in max_seq_len.
    budget = max(max_seq_len - max_new_tokens - len(prefix), 1)
    encoded = [
        prefix + tokenizer(prompt, add_special_tokens=False)["input_ids"][-budget:] for prompt in prompts
    ]
    length = max(len(ids) for ids in encoded)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    generated = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
    )
    new_tokens = generated[:, length:].tolist()
    outputs = []
    for tokens in new_tokens:
        if tokenizer.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tokenizer.eos_token_id)]
        outputs.append(tokenizer.decode(tokens, skip_special_tokens=True))
    return outputs

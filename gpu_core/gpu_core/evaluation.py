"""Evaluation: greedy generation, exact match and the loss of the expected answer.

Per eval example: the generated output (greedy, at most ``max_new_tokens``, stopping at eos),
exact match of the stripped output against the stripped expected answer, and the mean per-token
cross-entropy of the answer given everything before it, both from the same rendering as training
(:class:`gpu_core.data.Encoder`: under a chat template, generation continues the templated
conversation after the generation prompt). Few-shot demonstrations are earlier turns (chat) or
text before the prompt (raw). Generation is batched with left padding; the loss uses the
right-padded batches of :func:`gpu_core.data.collate`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpu_core.data import EncodedPair, Encoder, Turns, batches, collate
from gpu_core.runtime import per_example_mean_losses
from gpu_core.schemas import EvalExample, EvalMetrics, EvalRun, ExampleOutcome
from gpu_core.tiny import _bytes_to_unicode


def evaluate(
    model: Any,
    encoder: Encoder,
    examples: Sequence[EvalExample],
    device: torch.device,
    max_new_tokens: int,
    batch_size: int,
    demonstrations: Sequence[Turns] = (),
    on_progress: Callable[[float], None] | None = None,
) -> EvalRun:
    """Evaluate ``model`` on ``examples``, each preceded by ``demonstrations``."""
    model.eval()
    tokenizer = encoder.tokenizer
    outcomes: list[ExampleOutcome] = []
    for chunk in batches(examples, batch_size):
        conversations = [encoder.eval_turns(example.turns, demonstrations) for example in chunk]
        prompts = [encoder.generation_prompt(turns, max_new_tokens) for turns in conversations]
        outputs = generate(model, tokenizer, prompts, device, max_new_tokens)
        pairs = [encoder.encode(turns, last_only=True) for turns in conversations]
        losses = target_losses(model, pairs, tokenizer.pad_token_id, device)
        for example, output, loss in zip(chunk, outputs, losses, strict=True):
            outcomes.append(
                ExampleOutcome(
                    id=example.id or "",
                    output=output,
                    exact_match=output.strip() == example.answer.strip(),
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
    """Mean per-token cross-entropy over the labelled (target) tokens of each pair, from the
    logits of the labelled positions only."""
    batch = {key: value.to(device) for key, value in collate(pairs, pad_token_id).items()}
    return per_example_mean_losses(model, batch)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    device: torch.device,
    max_new_tokens: int,
) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batch), decoded without specials."""
    encoded = [list(ids) for ids in prompts]
    stop = stop_token_ids(model, tokenizer)
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
        eos_token_id=stop,
        pad_token_id=pad_id,
        # The loaded model's config turns the cache off for training and scoring; generation
        # wants it.
        use_cache=True,
    )
    new_tokens = generated[:, length:].tolist()
    outputs = []
    for tokens in new_tokens:
        ends = [tokens.index(token) for token in stop if token in tokens]
        if ends:
            tokens = tokens[: min(ends)]
        outputs.append(decode_answer(tokenizer, tokens))
    return outputs


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """eos and the model's own end-of-turn tokens (its generation config lists them, e.g. Llama
    3's <|eot_id|>), so an answer ends where the chat template ends a turn."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    ids = [tokenizer.eos_token_id, *configured]
    return list(dict.fromkeys(token for token in ids if token is not None))


def decode_answer(tokenizer: Any, tokens: list[int]) -> str:
    """Generated tokens as text. Bytes that are not valid UTF-8 (a byte-level model can stop in
    the middle of a character or invent byte sequences) read as ``\\xNN`` escapes rather than
    as replacement characters, so an answer always shows what the model produced."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if "\ufffd" not in text:
        return text
    raw = _byte_level_bytes(tokenizer, tokens)
    return text if raw is None else raw.decode("utf-8", errors="backslashreplace")


def _byte_level_bytes(tokenizer: Any, tokens: list[int]) -> bytes | None:
    """The bytes behind byte-level BPE tokens (GPT-2's byte alphabet: the tiny model, Llama 3,
    Qwen); None for a tokenizer whose tokens are not spelled in that alphabet."""
    byte_of = {char: byte for byte, char in _bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    spelled = "".join(tokenizer.convert_ids_to_tokens([token for token in tokens if token not in special]))
    if not all(char in byte_of for char in spelled):
        return None
    return bytes(byte_of[char] for char in spelled)

"""Tokenisation shared by training, evaluation, influence and the length report.

Every example is a list of (role, content) turns (a prompt/answer pair is one user turn and one
assistant turn). :class:`Encoder` turns it into ``input_ids`` and ``labels`` with -100 on every
token but the answer's; training, evaluation and every influence method compute their loss from
these labels, so the mask is the same everywhere.

Two renderings (the spec's ``template``):

- ``raw``: ``bos + prompt + answer + eos``, as before templates existed. Conversations are
  concatenated: a non-assistant turn's text, a newline before a following non-assistant turn,
  each assistant turn's text followed by eos.
- ``chat``: the tokenizer's own ``apply_chat_template``. The ids are exactly
  ``apply_chat_template(messages, tokenize=True)``; an assistant turn's tokens are those the
  conversation up to that turn adds after the generation prompt (end-of-turn marker included).

Training labels every assistant turn; evaluation and influence queries label the last one (the
expected answer) and generate from everything before it. Batches are right-padded with labels
-100 on padding, so under a causal mask the padded positions never affect the real ones.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from gpu_core.schemas import ResolvedTemplate, Template, TrainingExample

IGNORE_INDEX = -100
Turns = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class EncodedPair:
    input_ids: list[int]
    labels: list[int]

    @property
    def prompt_length(self) -> int:
        """Tokens before the first labelled one: what generation continues from."""
        return next((i for i, label in enumerate(self.labels) if label != IGNORE_INDEX), len(self.labels))


class TemplateError(ValueError):
    """The chat template cannot be used with this model or these examples."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(
    template: Template, tokenizer: Any, conversational: bool, model_id: str
) -> ResolvedTemplate:
    """``chat`` or ``raw``; ``auto`` is chat when the tokenizer has a template and the data holds
    conversations (messages or alpaca files)."""
    if template == "chat":
        if not has_chat_template(tokenizer):
            raise TemplateError(f"template: 'chat' but the tokenizer of {model_id!r} has no chat template")
        return "chat"
    if template == "auto" and conversational and has_chat_template(tokenizer):
        return "chat"
    return "raw"


def chat_template_sha256(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None


def _fit(prefix: list[int], ids: list[int], labels: list[int], max_seq_len: int) -> EncodedPair:
    """Fit ``prefix + ids`` into ``max_seq_len``: drop tokens before the first label from the left
    (keeping the most recent context), then tokens from the right; the prefix (bos) stays."""
    budget = max_seq_len - len(prefix)
    start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    context, rest, rest_labels = ids[:start], ids[start:], labels[start:]
    keep = max(budget - 1, 1)
    rest, rest_labels = rest[:keep], rest_labels[:keep]
    context = context[max(0, len(context) - (budget - len(rest))) :]
    return EncodedPair(
        input_ids=prefix + context + rest,
        labels=[IGNORE_INDEX] * (len(prefix) + len(context)) + rest_labels,
    )


def encode_pair(tokenizer: Any, prompt: str, target: str, max_seq_len: int) -> EncodedPair:
    """Raw ``bos + prompt + target + eos``, the target labelled; see :func:`_fit` for truncation."""
    return Encoder(tokenizer, "raw", max_seq_len).encode(
        [("user", prompt), ("assistant", target)], last_only=True
    )


@dataclass(frozen=True)
class Encoder:
    """Renders and tokenises turns under one template and sequence limit."""

    tokenizer: Any
    template: ResolvedTemplate
    max_seq_len: int

    def full(self, turns: Turns, last_only: bool = False) -> tuple[list[int], list[int], list[int]]:
        """(prefix, ids, labels) before truncation; the prefix is bos where it leads."""
        if self.template == "chat":
            ids, labels = self._chat(turns, last_only)
            bos = self.tokenizer.bos_token_id
            prefix = ids[:1] if ids and bos is not None and ids[0] == bos else []
            return prefix, ids[len(prefix) :], labels[len(prefix) :]
        ids, labels = self._raw(turns, last_only)
        prefix = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        return prefix, ids, labels

    def length(self, turns: Turns) -> int:
        """Tokens of the whole example before truncation."""
        return self.lengths([turns])[0]

    def lengths(self, examples: Sequence[Turns]) -> list[int]:
        """:meth:`length` of many examples; under a chat template one batched tokenizer call
        over the rendered texts (the labels are not needed to count)."""
        if self.template == "chat":
            texts = [self._render(turns, False) for turns in examples]
            return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        counts = []
        for turns in examples:
            prefix, ids, _ = self.full(turns)
            counts.append(len(prefix) + len(ids))
        return counts

    def encode(self, turns: Turns, last_only: bool = False) -> EncodedPair:
        """Every assistant turn labelled (training), or only the last one (eval, queries)."""
        return _fit(*self.full(turns, last_only), self.max_seq_len)

    def train_pair(self, example: TrainingExample) -> EncodedPair:
        return self.encode(example.turns)

    def eval_turns(self, turns: Turns, demonstrations: Sequence[Turns] = ()) -> list[tuple[str, str]]:
        """In chat, demonstrations become earlier turns (after the eval conversation's system turn);
        in raw, each is its text and a newline before the eval prompt."""
        if not demonstrations:
            return list(turns)
        system = [turn for turn in turns[:1] if turn[0] == "system"]
        rest = list(turns[len(system) :])
        if self.template == "chat":
            shots = [turn for demo in demonstrations for turn in demo if turn[0] != "system"]
            return [*system, *shots, *rest]
        prefix = "".join(_raw_text(demo) + "\n" for demo in demonstrations)
        first = next(i for i, turn in enumerate(rest) if turn[0] != "assistant")
        rest[first] = (rest[first][0], prefix + rest[first][1])
        return [*system, *rest]

    def generation_prompt(self, turns: Turns, max_new_tokens: int) -> list[int]:
        """Everything before the expected answer, the most recent tokens kept so the prompt and
        ``max_new_tokens`` fit in ``max_seq_len``."""
        prefix, ids, labels = self.full(turns, last_only=True)
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        budget = max(self.max_seq_len - max_new_tokens - len(prefix), 1)
        return prefix + ids[:start][-budget:]

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _raw(self, turns: Turns, last_only: bool) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        labels: list[int] = []
        last = max(i for i, (role, _) in enumerate(turns) if role == "assistant")
        eos = self.tokenizer.eos_token_id
        for index, (role, content) in enumerate(turns):
            if role == "assistant":
                tokens = self._tokens(content) + ([eos] if eos is not None else [])
                labelled = index == last or not last_only
            else:
                following = turns[index + 1][0] if index + 1 < len(turns) else "assistant"
                tokens = self._tokens(content + ("\n" if following != "assistant" else ""))
                labelled = False
            ids += tokens
            labels += tokens if labelled else [IGNORE_INDEX] * len(tokens)
        return ids, labels

    def _render(self, turns: Turns, generation_prompt: bool) -> str:
        messages = [{"role": role, "content": content} for role, content in turns]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _chat(self, turns: Turns, last_only: bool) -> tuple[list[int], list[int]]:
        text = self._render(turns, False)
        spans = []  # character spans of the labelled assistant turns
        assistant = [i for i, (role, _) in enumerate(turns) if role == "assistant"]
        for index in assistant[-1:] if last_only else assistant:
            before = self._render(turns[:index], True)
            through = self._render(turns[: index + 1], False)
            if not (text.startswith(through) and through.startswith(before)):
                raise TemplateError(
                    f"the chat template renders turns 1-{index} differently once the conversation "
                    "goes on, so the assistant's tokens cannot be told apart; use template 'raw'"
                )
            spans.append((len(before), len(through)))
        if not has_offsets(self.tokenizer):
            return self._chat_by_segments(text, spans)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        labels = [
            token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
            for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        return ids, labels

    def _chat_by_segments(self, text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[int], list[int]]:
        """A tokenizer without character offsets (a Python "slow" tokenizer): the rendering is
        cut at the labelled spans' edges and each piece tokenised on its own, so every token
        belongs to exactly one piece and a piece inside a span is labelled."""
        ids: list[int] = []
        labels: list[int] = []
        for begin, end, labelled in chat_segments(text, spans):
            tokens = self._tokens(text[begin:end])
            ids += tokens
            labels += tokens if labelled else [IGNORE_INDEX] * len(tokens)
        return ids, labels


def has_offsets(tokenizer: Any) -> bool:
    """Whether the tokenizer maps tokens to character offsets (the Rust "fast" tokenizers do)."""
    return bool(getattr(tokenizer, "is_fast", False))


def chat_segments(text: str, spans: Sequence[tuple[int, int]]) -> list[tuple[int, int, bool]]:
    """``(begin, end, inside a span)`` pieces covering ``text`` in order, cut at every span edge."""
    edges = sorted({0, len(text), *(edge for span in spans for edge in span)})
    return [
        (begin, end, any(start <= begin and end <= stop for start, stop in spans))
        for begin, end in zip(edges, edges[1:], strict=False)
        if end > begin
    ]


def token_offsets(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Character offsets into ``text`` of each token of ``tokenizer(text)``: the tokenizer's own
    where it has them, else token by token, from the lengths of the decoded prefixes."""
    if has_offsets(tokenizer):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(offset) for offset in encoded["offset_mapping"]]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    offsets, begin = [], 0
    for count in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:count], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        end = min(max(len(decoded), begin), len(text))
        offsets.append((begin, end))
        begin = end
    return offsets


def _raw_text(turns: Turns) -> str:
    """A conversation as plain text, without special tokens (a raw few-shot demonstration)."""
    text = ""
    for index, (role, content) in enumerate(turns):
        following = turns[index + 1][0] if index + 1 < len(turns) else "assistant"
        text += content + ("\n" if role != "assistant" and following != "assistant" else "")
    return text


def few_shot_demonstrations(training_data: Sequence[TrainingExample], k: int, seed: int) -> list[Turns]:
    """``k`` training examples' turns (chosen by ``seed``, in data order); none when ``k`` is 0."""
    if k <= 0 or not training_data:
        return []
    chosen = random.Random(seed).sample(range(len(training_data)), min(k, len(training_data)))
    return [training_data[i].turns for i in sorted(chosen)]


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

"""What the researcher should know about the data before submitting, without torch.

A preview of the first training example as the model will see it (the trained tokens marked),
token lengths with the model's own tokenizer and the rendering the run will use
(:class:`gpu_core.data.Encoder`, so the counts are the pipeline's), how many examples exceed
``max_seq_len`` and which, exact duplicate examples, and eval examples that copy a training
example. The gateway computes this for ``POST /api/estimate``: it carries ``tokenizers`` and
``transformers`` (tokenizers and chat templates load without torch) but never downloads from a
model hub, so a model whose tokenizer is not in the local Hugging Face cache gets a report whose
token part says why it is unavailable; the rest of the report needs no tokenizer.
"""

from __future__ import annotations

import functools
import hashlib
import json
import statistics
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpu_core.data import IGNORE_INDEX, Encoder, TemplateError, resolve_template
from gpu_core.schemas import TINY_MODEL_ID, ExperimentSpec
from gpu_core.tiny_chat import TINY_CHAT_MODEL_ID

MAX_NAMED = 50  # ids listed per finding; the counts are always complete
_LENGTHS_KEPT = 8
_LENGTHS: dict[tuple[str, str, str], list[int]] = {}  # oldest first


class TokenizerUnavailable(Exception):
    """The tokenizer cannot be loaded here; the message says why."""


# One load at a time: lru_cache does not hold concurrent callers of the same id back, and two
# threads making transformers' first lazy import together can see it half made ("cannot import
# name 'PreTrainedTokenizerFast'", a 500 from the gateway's two estimates of a freshly filled form).
_LOADING = threading.Lock()


def load_tokenizer(model_id: str) -> Any:
    """The built-in tiny tokenizer (both built-in models share it), or a hub model's tokenizer
    from the local cache only."""
    with _LOADING:
        return _load_tokenizer(model_id)


@functools.lru_cache(maxsize=8)
def _load_tokenizer(model_id: str) -> Any:
    if model_id in (TINY_MODEL_ID, TINY_CHAT_MODEL_ID):
        from gpu_core.tiny import build_tokenizer

        return build_tokenizer()
    if Path(model_id).expanduser().is_absolute() or model_id.startswith((".", "~")):
        raise TokenizerUnavailable(
            f"{model_id!r} is a directory on the compute machine; its tokenizer is read there"
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_id, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise TokenizerUnavailable(
            f"the tokenizer of {model_id!r} is not on this server and it does not download from the "
            f"model hub ({type(exc).__name__})"
        ) from None


def _distribution(lengths: Sequence[int], ids: Sequence[str], max_seq_len: int) -> dict[str, Any]:
    ordered = sorted(lengths)
    truncated = [(i, n) for i, n in zip(ids, lengths, strict=True) if n > max_seq_len]
    return {
        "n": len(lengths),
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
        "truncated": len(truncated),
        "truncated_examples": [{"id": i, "tokens": n} for i, n in truncated[:MAX_NAMED]],
    }


def _duplicates(examples: Sequence[Any]) -> list[list[str]]:
    groups: dict[tuple[tuple[str, str], ...], list[str]] = {}
    for example in examples:
        groups.setdefault(tuple(example.turns), []).append(example.id)
    return [ids for ids in groups.values() if len(ids) > 1][:MAX_NAMED]


def _copies(spec: ExperimentSpec) -> list[dict[str, str]]:
    training: dict[tuple[tuple[str, str], ...], str] = {}
    for example in spec.training_data:
        training.setdefault(tuple(example.turns), example.assigned_id)
    return [
        {"eval_id": example.assigned_id, "training_id": training[tuple(example.turns)]}
        for example in spec.eval_data
        if tuple(example.turns) in training
    ]


def _lengths(encoder: Encoder, model_id: str, examples: list[list[tuple[str, str]]]) -> list[int]:
    """Token counts, remembered for the last few data sets: the page asks for an estimate on
    every hyperparameter change, and the counts depend only on the model, template and data."""
    digest = hashlib.sha256(json.dumps(examples).encode()).hexdigest()
    key = (model_id, encoder.template, digest)
    if key not in _LENGTHS:
        if len(_LENGTHS) >= _LENGTHS_KEPT:
            _LENGTHS.pop(next(iter(_LENGTHS)))
        _LENGTHS[key] = encoder.lengths(examples)
    return _LENGTHS[key]


def _token_report(spec: ExperimentSpec) -> dict[str, Any]:
    if spec.training_dataset_id or spec.eval_dataset_id:
        # A stored dataset is read a row at a time by the worker, never tokenized for a report.
        return {"available": False, "reason": "Token counts are unavailable for a stored dataset."}
    try:
        tokenizer = load_tokenizer(spec.model_id)
    except TokenizerUnavailable as exc:
        return {"available": False, "reason": f"Token counts are unavailable: {exc}."}
    conversational = any(e.is_conversation for e in (*spec.training_data, *spec.eval_data))
    try:
        template = resolve_template(spec.template, tokenizer, conversational, spec.model_id)
    except TemplateError as exc:
        return {"available": False, "reason": str(exc), "template_error": str(exc)}
    max_seq_len = spec.hyperparams.max_seq_len
    encoder = Encoder(tokenizer, template, max_seq_len)
    try:
        train = _lengths(encoder, spec.model_id, [e.turns for e in spec.training_data])
        evals = _lengths(encoder, spec.model_id, [e.turns for e in spec.eval_data])
    except TemplateError as exc:
        return {"available": False, "reason": str(exc), "template_error": str(exc)}
    return {
        "available": True,
        "template": template,
        "preview": _preview(encoder, spec.training_data[0]),
        "max_seq_len": max_seq_len,
        "training": _distribution(train, [e.assigned_id for e in spec.training_data], max_seq_len),
        "eval": _distribution(evals, [e.assigned_id for e in spec.eval_data], max_seq_len),
    }


def _preview(encoder: Encoder, example: Any) -> dict[str, Any]:
    """The first training example as the model sees it: runs of text, each marked whether the
    loss trains on it (the assistant's tokens)."""
    prefix, ids, labels = encoder.full(example.turns)
    runs: list[dict[str, Any]] = []
    for token, label in zip(prefix + ids, [IGNORE_INDEX] * len(prefix) + labels, strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1]["trained"] == trained:
            runs[-1]["ids"].append(token)
        else:
            runs.append({"trained": trained, "ids": [token]})
    decode = encoder.tokenizer.decode
    return {"id": example.id, "runs": [{"text": decode(r["ids"]), "trained": r["trained"]} for r in runs]}


def data_report(spec: ExperimentSpec) -> dict[str, Any]:
    """The report as a JSON object; see the module docstring."""
    tokens = _token_report(spec)
    copies = _copies(spec)
    report: dict[str, Any] = {
        "training_format": spec.data_format.training,
        "eval_format": spec.data_format.eval,
        "template": spec.template,
        "tokens": tokens,
        "duplicates": {"training": _duplicates(spec.training_data), "eval": _duplicates(spec.eval_data)},
        "eval_copies_training": copies[:MAX_NAMED],
        "eval_copies_count": len(copies),
    }
    report["notes"] = _notes(report)
    return report


def _notes(report: dict[str, Any]) -> list[str]:
    """The findings in one sentence each, for the page and the CLI."""
    notes = []
    tokens = report["tokens"]
    if not tokens["available"]:
        notes.append(tokens["reason"])
    else:
        for part, label in (("training", "training"), ("eval", "eval")):
            stats = tokens[part]
            if stats["truncated"]:
                named = ", ".join(e["id"] for e in stats["truncated_examples"][:10])
                more = "…" if stats["truncated"] > 10 else ""
                notes.append(
                    f"{stats['truncated']} of {stats['n']} {label} examples exceed max_seq_len "
                    f"{tokens['max_seq_len']} tokens and will be truncated: {named}{more}"
                )
    for part in ("training", "eval"):
        for ids in report["duplicates"][part]:
            notes.append(f"Duplicate {part} examples (identical text): {', '.join(ids)}")
    copies = report["eval_copies_training"]
    if copies:
        pairs = ", ".join(f"{c['eval_id']} = {c['training_id']}" for c in copies[:10])
        notes.append(f"{report['eval_copies_count']} eval examples copy a training example: {pairs}")
    return notes

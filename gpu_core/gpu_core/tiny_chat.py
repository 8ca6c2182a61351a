"""``local/tiny-chat``: ``local/tiny-llama``'s architecture and byte-level tokenizer, pretrained
once at first use on English text that ships with Python (the Zen of Python and the docstrings
of a fixed list of standard-library modules), so that before fine-tuning it answers in printable
words rather than the random model's repeated characters.

Pretraining is deterministic (seeded, one thread, fixed order) and takes about a minute on one
CPU core (66 s measured on a 2-core machine busy with other work); the result is saved with
``save_pretrained`` next to the tiny model's cache and loaded through the same
``from_pretrained`` code as any model. The text differs slightly between Python versions, so two
machines on different Pythons may build slightly different weights; the corpus digest is saved
in the model's config (``pretraining_corpus_sha256``).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import importlib
import io
import re
from pathlib import Path
from typing import Any

from gpu_core.tiny import _EMBEDDING_STD, build_tokenizer, cached_model_dir, tiny_config

TINY_CHAT_MODEL_ID = "local/tiny-chat"
# Bump when the corpus, the schedule or the architecture changes, so old caches are not reused.
_VERSION = "v1"
# Stable, prose-rich modules; their docstrings and those of their public members.
_CORPUS_MODULES = (
    "string", "textwrap", "json", "csv", "random", "statistics", "fractions", "decimal", "datetime",
    "calendar", "collections", "functools", "itertools", "pathlib", "shutil", "tempfile", "logging",
    "argparse", "difflib", "heapq", "bisect", "queue", "threading", "subprocess", "urllib.parse",
    "email.message", "http.client", "html", "zipfile", "tarfile", "gzip", "base64", "hashlib",
)  # fmt: skip
_STEPS = 300
_BATCH = 16
_WINDOW = 64
_LEARNING_RATE = 5e-3
_SEED = 4321


def corpus_text() -> str:
    """The pretraining text: the Zen of Python, then each module's docstrings, whitespace
    collapsed to single spaces."""
    # Importing ``this`` prints the Zen; a worker's stdout may be its event channel.
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    parts = [codecs.decode(this.s, "rot13")]
    for name in _CORPUS_MODULES:
        module = importlib.import_module(name)
        members = [module] + [
            getattr(module, attr) for attr in sorted(vars(module)) if not attr.startswith("_")
        ]
        for member in members:
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str) and getattr(member, "__module__", name) in (name, None):
                parts.append(doc)
    text = " ".join(re.sub(r"\s+", " ", part).strip() for part in parts)
    # Words and sentence punctuation only: no code symbols, no multi-byte characters.
    return re.sub(r" +", " ", re.sub(r"[^A-Za-z0-9 .,;:'?!-]", " ", text))


def tiny_chat_model_dir() -> Path:
    """Directory of the pretrained tiny chat model, pretraining it on first use."""
    return cached_model_dir(f"tiny-chat-{_VERSION}", _build)


def pretrain(model: Any, ids: Any) -> list[float]:
    """Next-byte prediction on random windows of ``ids``; the loss per step."""
    import torch

    generator = torch.Generator().manual_seed(_SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=_LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / _STEPS)
    losses = []
    model.train()
    for _ in range(_STEPS):
        starts = torch.randint(0, len(ids) - _WINDOW - 1, (_BATCH,), generator=generator)
        batch = torch.stack([ids[start : start + _WINDOW] for start in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _build(directory: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    text = corpus_text()
    config = tiny_config(tokenizer)
    config.pretraining_corpus_sha256 = hashlib.sha256(text.encode()).hexdigest()
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        # One thread: the same sums in the same order on every machine.
        torch.set_num_threads(1)
        try:
            model = LlamaForCausalLM(config)
            with torch.no_grad():
                model.model.embed_tokens.weight.normal_(0.0, _EMBEDDING_STD)
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
            pretrain(model, ids)
        finally:
            torch.set_num_threads(threads)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)

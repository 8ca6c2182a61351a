"""``local/tiny-llama``: a small random-initialised Llama with a byte-level tokenizer.

It is built deterministically from a seed (no files, no download), saved once to a cache
directory with ``save_pretrained``, and then loaded through the same ``from_pretrained`` code as
any hub or local model. Tests and the embedded default run on it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

TINY_MODEL_ID = "local/tiny-llama"
# Bump when the architecture, initialisation or tokenizer changes, so old caches are not reused.
_TINY_VERSION = "v3"
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
# A Zephyr-style template (as TinyLlama Chat's): each turn ends with eos, so generation from the
# assistant's generation prompt stops where a turn ends.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# With tied embeddings the logits are bounded by |final hidden| x |embedding row|; at the default
# init (std 0.02) no adapter can make a token much likelier than the rest, so the embeddings get
# a larger scale and LoRA can learn small tasks in a few steps.
_EMBEDDING_STD = 0.1


def cache_root() -> Path:
    configured = os.environ.get("GPU_CORE_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "influence-dashboard"


def tiny_model_dir() -> Path:
    """Directory of the saved tiny model, building it on first use."""
    return cached_model_dir(f"tiny-llama-{_TINY_VERSION}", _build)


def cached_model_dir(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_root() / name``, made by ``build(staging)`` on first use and renamed into place, so
    concurrent first uses never see half a model."""
    target = cache_root() / name
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its copy was built the same way (same seed).
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = _bytes_to_unicode()
    vocab = {token: index for index, token in enumerate(_SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[byte_chars[byte]] = len(_SPECIAL_TOKENS) + byte
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer: Any) -> Any:
    """The tiny Llama's ``LlamaConfig`` (``local/tiny-chat`` shares it)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _build(directory: Path) -> None:
    import torch
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, _EMBEDDING_STD)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)

"""Answers with bytes that are not UTF-8 read as escapes, not as replacement characters."""

from __future__ import annotations

from gpu_core.evaluation import decode_answer
from gpu_core.tiny import build_tokenizer

OFFSET = 3  # the tiny tokenizer's byte b is token 3 + b, after <pad>, <s>, </s>


def byte_tokens(raw: bytes) -> list[int]:
    return [OFFSET + byte for byte in raw]


def test_invalid_utf8_reads_as_escapes() -> None:
    tokenizer = build_tokenizer()
    assert decode_answer(tokenizer, byte_tokens(b" red\xe2\x80")) == " red\\xe2\\x80"
    assert decode_answer(tokenizer, byte_tokens(b"\xff\xfe ok")) == "\\xff\\xfe ok"


def test_valid_text_and_special_tokens_are_unchanged() -> None:
    tokenizer = build_tokenizer()
    assert decode_answer(tokenizer, byte_tokens(" café ✓".encode())) == " café ✓"
    # A real U+FFFD that the model spelled out in UTF-8 stays as it is.
    assert decode_answer(tokenizer, byte_tokens("a\ufffdb".encode())) == "a\ufffdb"
    with_eos = [*byte_tokens(b"\xe2"), tokenizer.eos_token_id]
    assert decode_answer(tokenizer, with_eos) == "\\xe2"

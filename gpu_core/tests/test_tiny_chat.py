"""local/tiny-chat: pretrained once on text that ships with Python, it answers in words before any
fine-tuning, where the random local/tiny-llama repeats characters."""

from __future__ import annotations

import json
import re

import torch
from transformers import AutoModelForCausalLM

from gpu_core.runtime import resolve_source
from gpu_core.tiny import build_tokenizer, tiny_model_dir
from gpu_core.tiny_chat import TINY_CHAT_MODEL_ID, corpus_text, tiny_chat_model_dir

PROMPTS = ("Color of apple?", "Sound of duck?", "Opposite of hot?")


def _greedy(directory, prompt: str) -> str:
    tokenizer = build_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(directory)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0][ids.shape[1] :], skip_special_tokens=True)


def test_the_corpus_is_english_prose_from_the_standard_library() -> None:
    text = corpus_text()
    assert text.startswith("The Zen of Python, by Tim Peters Beautiful is better than ugly.")
    assert len(text) > 100_000 and text == corpus_text()
    assert re.fullmatch(r"[A-Za-z0-9 .,;:'?!-]+", text)


def test_tiny_chat_answers_in_printable_words_before_fine_tuning() -> None:
    directory = tiny_chat_model_dir()
    assert resolve_source(TINY_CHAT_MODEL_ID) == (str(directory), True)
    assert directory != tiny_model_dir()
    config = json.loads((directory / "config.json").read_text())
    assert len(config["pretraining_corpus_sha256"]) == 64
    for prompt in PROMPTS:
        answer = _greedy(directory, prompt)
        assert answer.isprintable() and answer.isascii(), repr(answer)
        # Words of letters, not one character over and over (what the random model does).
        assert re.search(r"[a-z]{2,}", answer), repr(answer)
        assert len(set(answer.replace(" ", ""))) > 2, repr(answer)

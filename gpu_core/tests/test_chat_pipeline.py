"""Chat data through the whole pipeline on the tiny model: the template in evaluation and
few-shot, and influence with the assistant-only loss for every method."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from gpu_core.data import Encoder, few_shot_demonstrations
from gpu_core.evaluation import evaluate
from gpu_core.influence import METHODS
from gpu_core.pipeline import run_experiment_to_result
from gpu_core.runtime import load_model
from gpu_core.schemas import parse_spec

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def chat_spec(method: str, **fields: Any) -> Any:
    train = [json.loads(line) for line in (EXAMPLES / "chat_train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (EXAMPLES / "chat_eval.jsonl").read_text().splitlines()]
    return parse_spec(
        {
            "training_data": train[:3] + train[-1:],  # the last one has two assistant turns
            "eval_data": evals[:2],
            "hyperparams": {"epochs": 1, "batch_size": 2, "max_seq_len": 96, "max_new_tokens": 4},
            "few_shot_k": 2,
            "influence_method": method,
            **fields,
        }
    )


def test_evaluation_and_few_shot_generate_from_the_templated_conversation() -> None:
    spec = chat_spec("tracin", hyperparams={"max_seq_len": 512, "max_new_tokens": 4})
    loaded = load_model(spec.model_id, device=torch.device("cpu"))
    tokenizer = loaded.tokenizer
    encoder = Encoder(tokenizer, "chat", spec.hyperparams.max_seq_len)
    seen: list[list[int]] = []
    generate = loaded.model.generate

    def recording_generate(**kwargs: Any) -> Any:
        for ids, mask in zip(kwargs["input_ids"].tolist(), kwargs["attention_mask"].tolist(), strict=True):
            seen.append([token for token, keep in zip(ids, mask, strict=True) if keep])
        return generate(**kwargs)

    loaded.model.generate = recording_generate
    demos = few_shot_demonstrations(spec.training_data, 2, seed=0)
    run = evaluate(loaded.model, encoder, spec.eval_data, torch.device("cpu"), 4, 8, demonstrations=demos)
    assert run.metrics.n == 2
    for ids, example in zip(seen, spec.eval_data, strict=True):
        system, *turns = example.messages
        shots = [{"role": r, "content": c} for demo in demos for r, c in demo if r != "system"]
        conversation = [system.model_dump(), *shots, *(m.model_dump() for m in turns[:-1])]
        expected = tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        assert ids == list(expected["input_ids"])
        demo_answers = sum(role == "assistant" for demo in demos for role, _ in demo)
        assert tokenizer.decode(ids).count("<|assistant|>") == demo_answers + 1  # and the prompt's


@pytest.mark.parametrize("method", METHODS)
def test_influence_on_chat_data_runs_for_every_method(method: str) -> None:
    result = run_experiment_to_result(chat_spec(method))
    assert result.data is not None
    assert (result.data.template, result.data.training_format) == ("chat", "messages")
    assert result.data.chat_template_sha256 is not None and len(result.data.chat_template_sha256) == 64
    scores = result.influence.scores
    assert len(scores) == 2 and all(len(row) == 4 for row in scores)
    assert all(math.isfinite(s) for row in scores for s in row)
    assert any(s != 0 for row in scores for s in row)


def test_raw_template_on_chat_data_is_recorded() -> None:
    result = run_experiment_to_result(chat_spec("tracin", template="raw"))
    assert result.data is not None and result.data.template == "raw"
    assert result.data.chat_template_sha256 is None

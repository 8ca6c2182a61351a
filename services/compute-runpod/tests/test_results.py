"""The worker's result chunking and the service's reassembly, against each other."""

from __future__ import annotations

import json
from types import ModuleType

import pytest
from runpod_testkit import load_worker_handler

from compute_runpod.errors import ProviderError
from compute_runpod.results import assemble_result, error_text, final_result


@pytest.fixture(scope="module")
def worker() -> ModuleType:
    return load_worker_handler("runpod_worker_under_test")


RESULT = {"text": 'quotes " and \\ backslashes \u00e9', "scores": [[0.125] * 50] * 20}


def test_small_result_is_one_chunk(worker: ModuleType) -> None:
    chunks = list(worker.result_chunks(RESULT, 1_000_000))
    assert chunks == [{"type": "result", "result": RESULT}]
    assert json.loads(assemble_result(chunks)) == RESULT


def test_large_result_goes_in_parts_that_fit_and_reassemble(worker: ModuleType) -> None:
    chunks = list(worker.result_chunks(RESULT, 300))
    assert len(chunks) > 5
    assert all(len(json.dumps(c["data"])) <= 300 for c in chunks)
    assert [c["index"] for c in chunks] == list(range(len(chunks)))
    assert json.loads(final_result(list(reversed(chunks)))) == RESULT


def test_missing_part_is_never_a_truncated_result(worker: ModuleType) -> None:
    chunks = list(worker.result_chunks(RESULT, 300))
    assert assemble_result(chunks[:-1]) is None
    with pytest.raises(ProviderError, match="parts of its result are missing"):
        final_result(chunks[:-1])


def test_checksum_mismatch_is_an_error(worker: ModuleType) -> None:
    chunks = list(worker.result_chunks(RESULT, 300))
    chunks[1] = {**chunks[1], "data": chunks[1]["data"][:-1] + "X"}
    with pytest.raises(ProviderError, match="checksum mismatch"):
        final_result(chunks)


def test_no_result_at_all_is_an_error() -> None:
    with pytest.raises(ProviderError, match="RunPod returned no output.*payload limit"):
        final_result([{"type": "progress", "stage": "training", "progress": 0.5}])


async def test_invalid_spec_is_yielded_as_error_naming_the_field(worker: ModuleType) -> None:
    outputs = [o async for o in worker.handler({"id": "j", "input": {"training_data": [], "eval_data": []}})]
    assert len(outputs) == 1 and "training_data" in outputs[0]["error"]


def test_runpod_error_forms_in_plain_words() -> None:
    assert error_text("Invalid experiment spec: x") == "Invalid experiment spec: x"
    raised = json.dumps({"error_type": "ValueError", "error_message": "boom", "error_traceback": "..."})
    assert error_text(raised) == "ValueError: boom"
    generator = 'handler: CUDA out of memory \ntraceback: Traceback (most recent call last):\n  File "x"'
    assert error_text(generator) == "The experiment failed on the RunPod worker: CUDA out of memory"
    assert error_text(None) == "The worker failed without saying why"


def test_money_in_messages_keeps_the_digits_that_matter() -> None:
    from compute_runpod.provider import usd

    assert usd(0.002) == "$0.0020"
    assert usd(0.0136) == "$0.014"
    assert usd(0.5) == "$0.50"
    assert usd(1234.5) == "$1,234.50"
    assert usd(0) == "$0.00"

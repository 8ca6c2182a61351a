"""Uploaded data files through gpu_core's parser, and the data report in the estimate."""

from __future__ import annotations

import json
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


async def test_a_chat_file_is_read_into_spec_examples(gateway) -> None:
    headers = await gateway.sign_in("alice")
    answer = await gateway.client.post(
        "/api/data/parse",
        params={"kind": "train", "filename": "chat_train.jsonl"},
        content=(EXAMPLES / "chat_train.jsonl").read_bytes(),
        headers=headers,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["format"], body["format_label"], body["count"]) == ("messages", "chat messages", 27)
    assert body["examples"][0]["messages"][1] == {"role": "user", "content": "Color of apple?"}

    alpaca = b'instruction,input,output\nAdd,"2, 3",5\n'
    answer = await gateway.client.post(
        "/api/data/parse", params={"kind": "train", "filename": "a.csv"}, content=alpaca, headers=headers
    )
    assert answer.json()["format"] == "alpaca"
    assert answer.json()["examples"] == [
        {"messages": [{"role": "user", "content": "Add\n2, 3"}, {"role": "assistant", "content": "5"}]}
    ]


async def test_a_bad_file_is_a_422_naming_line_and_field(gateway) -> None:
    headers = await gateway.sign_in("alice")
    rows = [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"prompt": "q", "expected": "a"},
    ]
    answer = await gateway.client.post(
        "/api/data/parse",
        params={"kind": "eval", "filename": "bad.jsonl"},
        content="".join(json.dumps(r) + "\n" for r in rows).encode(),
        headers=headers,
    )
    assert answer.status_code == 422
    assert answer.json()["detail"] == [
        {
            "field": "line 2",
            "message": "field \"messages[0].role\": Input should be 'system', 'user' or 'assistant'",
        },
        {
            "field": "line 3",
            "message": "is prompt / completion but line 1 is chat messages; a file holds one format",
        },
    ]
    empty = await gateway.client.post(
        "/api/data/parse", params={"kind": "eval", "filename": "e.jsonl"}, content=b"", headers=headers
    )
    assert empty.status_code == 400 and "e.jsonl is empty" in empty.json()["detail"]
    unknown_kind = await gateway.client.post(
        "/api/data/parse", params={"kind": "test", "filename": "e.jsonl"}, content=b"{}", headers=headers
    )
    assert unknown_kind.status_code == 422
    unsigned = await gateway.client.post(
        "/api/data/parse", params={"kind": "eval", "filename": "e"}, content=b"x"
    )
    assert unsigned.status_code == 401


async def test_the_estimate_carries_the_data_report(gateway) -> None:
    headers = await gateway.sign_in("alice")
    train = [json.loads(line) for line in (EXAMPLES / "chat_train.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (EXAMPLES / "chat_eval.jsonl").read_text().splitlines()]
    spec = {
        "training_data": train,
        "eval_data": evals,
        "hyperparams": {"max_seq_len": 100},
        "data_format": {"training": "messages"},
    }
    answer = await gateway.client.post("/api/estimate", json=spec, headers=headers)
    assert answer.status_code == 200, answer.text
    report = answer.json()["data_report"]
    assert report["training_format"] == "messages" and report["tokens"]["template"] == "chat"
    truncated = report["tokens"]["training"]["truncated_examples"]
    assert [e["id"] for e in truncated] == ["chat-two-turns"] and truncated[0]["tokens"] > 100
    copies = {c["eval_id"]: c["training_id"] for c in report["eval_copies_training"]}
    assert copies["dup-apple"] == "color-apple"
    assert any("will be truncated: chat-two-turns" in note for note in report["notes"])

    hub = await gateway.client.post(
        "/api/estimate", json={**spec, "model_id": "Qwen/Qwen2.5-0.5B-Instruct"}, headers=headers
    )
    assert hub.status_code == 200
    assert hub.json()["data_report"]["tokens"]["available"] is False
    assert "Token counts are unavailable" in hub.json()["data_report"]["tokens"]["reason"]

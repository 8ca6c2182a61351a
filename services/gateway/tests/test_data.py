"""Uploaded data files through gpu_core's parser, and the data report in the estimate."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

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


# ---- hostile files against a gateway process: its memory is what is measured -----------------


def _parquet(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", use_dictionary=True)
    return buffer.getvalue()


def _peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


@pytest.fixture
def gateway_process() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``python -m gateway`` on a free loopback port (local sign-in; nothing behind it is called)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "AUTH_MODE", "JWT_"))}
    env |= {"GATEWAY_HOST": "127.0.0.1", "GATEWAY_PORT": str(port), "AUTH_MODE": "local"}
    process = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.1)
        yield process, url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_parquet_bombs_are_refused_quickly_within_bounded_memory(gateway_process) -> None:
    process, url = gateway_process
    with httpx.Client(base_url=url, timeout=30) as client:
        token = client.post("/api/auth/local", json={"username": "mallory"}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}

        def parse(name: str, data: bytes) -> tuple[httpx.Response, float]:
            started = time.monotonic()
            answer = client.post(
                "/api/data/parse", params={"kind": "train", "filename": name}, content=data, headers=headers
            )
            return answer, time.monotonic() - started

        # A good Parquet first: pyarrow's import and pools are not what is measured.
        good = _parquet(pa.table({"prompt": ["q"] * 100, "completion": ["a"] * 100}))
        assert parse("good.parquet", good)[0].status_code == 200
        baseline = _peak_rss_mb(process.pid)

        many_rows = _parquet(pa.table({"prompt": ["q"] * 2_000_000, "completion": ["a"] * 2_000_000}))
        one_mb = "x" * 1_000_000
        long_strings = _parquet(pa.table({"prompt": [one_mb] * 50, "completion": [one_mb] * 50}))
        assert len(many_rows) < 20_000 and len(long_strings) < 2_000
        for name, data, limit in [
            ("rows.parquet", many_rows, "has 2,000,000 rows; the limit is 10,000 examples"),
            ("strings.parquet", long_strings, "decodes to more than 32 MiB; the limit is 32 MiB"),
        ]:
            answer, seconds = parse(name, data)
            assert answer.status_code == 413, answer.text
            assert answer.json()["detail"] == f"{name} {limit}"
            assert seconds < 5, f"{name} took {seconds:.1f} s"
            print(f"{name}: {len(data)} bytes, {answer.status_code} in {seconds:.2f} s")
        growth = _peak_rss_mb(process.pid) - baseline
        print(f"gateway peak memory growth: {growth:.0f} MB")
        assert growth < 100, f"the gateway's peak memory grew by {growth:.0f} MB"

        deep = ("[" * 200_000 + "]" * 200_000).encode()
        answer, _ = parse("deep.json", deep)
        assert answer.status_code == 422
        assert answer.json()["detail"] == [
            {"field": "file", "message": "the file is nested more than 64 deep; the limit is 64"}
        ]
        # Still serving.
        assert client.get("/healthz").status_code == 200
        assert parse("good.parquet", good)[0].status_code == 200

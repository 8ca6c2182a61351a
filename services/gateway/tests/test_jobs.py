"""Job routes against the scripted scheduler: submit, idempotency, status, results, cancel,
Server-Sent Events, and 404 for another user's job."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from influence.v1 import common_pb2


def parse_sse(text: str) -> list[dict[str, str]]:
    """Split an event stream into messages; comments come back as {"comment": ...}."""
    messages = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        message: dict[str, str] = {}
        for line in block.split("\n"):
            if line.startswith(":"):
                message["comment"] = line[1:].strip()
            else:
                name, _, value = line.partition(": ")
                message[name] = value
        messages.append(message)
    return messages


async def test_submit_passes_the_validated_spec_and_idempotency_key(gateway, upstream, make_spec) -> None:
    headers = await gateway.sign_in("alice")
    first = await gateway.client.post(
        "/api/train", json=make_spec(), headers={**headers, "Idempotency-Key": "try-1"}
    )
    assert first.status_code == 202, first.text
    body = first.json()
    assert body == {
        "job_id": body["job_id"],
        "status": "queued",
        "estimated_time_s": 120.0,
        "estimated_cost_usd": 0.05,
    }
    assert first.headers["location"] == f"/api/jobs/{body['job_id']}"
    request = upstream.scheduler.submit_requests[-1]
    assert request.idempotency_key == "try-1"
    stored = json.loads(request.spec_json)
    # The spec reaches the scheduler normalised: ids filled in, defaults explicit.
    assert [example["id"] for example in stored["training_data"]] == ["t1", "t2"]
    assert stored["hyperparams"]["epochs"] == 1 and stored["influence_method"] == "tracin"

    again = await gateway.client.post(
        "/api/train", json=make_spec(), headers={**headers, "Idempotency-Key": "try-1"}
    )
    assert again.json()["job_id"] == body["job_id"]
    without = await gateway.client.post("/api/train", json=make_spec(), headers=headers)
    assert without.json()["job_id"] != body["job_id"]
    assert upstream.scheduler.submit_requests[-1].idempotency_key == ""


async def test_trace_context_is_forwarded(gateway, upstream, make_spec) -> None:
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    headers = {**await gateway.sign_in("alice"), "traceparent": traceparent}
    assert (await gateway.client.post("/api/train", json=make_spec(), headers=headers)).status_code == 202
    assert upstream.scheduler.metadata_seen[-1]["traceparent"] == traceparent

    await gateway.client.post("/api/train", json=make_spec(), headers=await gateway.sign_in("alice"))
    started = upstream.scheduler.metadata_seen[-1]["traceparent"]
    assert started.startswith("00-") and started.split("-")[1] != traceparent.split("-")[1]


async def test_job_status_and_list(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    await upstream.scheduler.add_event(
        job_id,
        "training",
        0.5,
        epoch=1,
        total_epochs=3,
        step=4,
        loss=1.25,
        eta_s=30.0,
        message="epoch 1 of 3",
    )
    response = await gateway.client.get(f"/api/jobs/{job_id}", headers=headers)
    assert response.status_code == 200
    job = response.json()
    assert job["status"] == "running" and job["stage"] == "training" and job["progress"] == 0.5
    assert job["metrics"] == {
        "epoch": 1,
        "total_epochs": 3,
        "step": 4,
        "loss": 1.25,
        "eta_s": 30.0,
        "message": "epoch 1 of 3",
    }
    assert job["backend"] == "hosted" and job["provider"] == "local"
    assert job["created_at"].endswith("Z") and job["finished_at"] is None

    upstream.scheduler.add_job("local:bob")
    listed = (await gateway.client.get("/api/jobs", headers=headers)).json()["jobs"]
    assert [entry["job_id"] for entry in listed] == [job_id]


async def test_results_are_409_until_completed_then_returned_as_is(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    early = await gateway.client.get(f"/api/jobs/{job_id}/results", headers=headers)
    assert early.status_code == 409
    assert "running" in early.json()["detail"]

    result = {"eval_results": {"base": {}}, "influence": {"scores": [[0.5, -0.25]]}}
    await upstream.scheduler.finish(job_id, result)
    done = await gateway.client.get(f"/api/jobs/{job_id}/results", headers=headers)
    assert done.status_code == 200
    assert done.content == upstream.scheduler.jobs[job_id].result_json
    assert done.json() == result


async def test_cancel(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    response = await gateway.client.post(f"/api/jobs/{job_id}/cancel", headers=headers)
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert upstream.scheduler.jobs[job_id].job.state == common_pb2.JOB_STATE_CANCELLED


async def test_another_users_job_is_404_on_every_route(gateway, upstream) -> None:
    alice = await gateway.sign_in("alice")
    bob = await gateway.sign_in("bob")
    job_id = upstream.scheduler.add_job("local:alice")
    await upstream.scheduler.finish(job_id, {"ok": True})
    routes = [
        ("GET", f"/api/jobs/{job_id}"),
        ("GET", f"/api/jobs/{job_id}/events"),
        ("GET", f"/api/jobs/{job_id}/results"),
        ("POST", f"/api/jobs/{job_id}/cancel"),
    ]
    for method, path in routes:
        response = await gateway.client.request(method, path, headers=bob)
        assert response.status_code == 404, (method, path, response.status_code)
        assert response.json() == {"detail": "Job not found"}
        assert (await gateway.client.request(method, path, headers=alice)).status_code != 404
    # The cancel above was alice's own; bob's attempt changed nothing before it.
    malformed = await gateway.client.get("/api/jobs/..%2Fetc", headers=alice)
    assert malformed.status_code == 404


async def _job_with_events(upstream: Any, user: str, count: int) -> str:
    job_id = upstream.scheduler.add_job(user)
    for index in range(1, count + 1):
        await upstream.scheduler.add_event(job_id, "training", index / 10, step=index)
    await upstream.scheduler.finish(job_id, {})
    return job_id


async def test_events_stream_every_event_then_end(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = await _job_with_events(upstream, "local:alice", 3)
    response = await gateway.client.get(f"/api/jobs/{job_id}/events", headers=headers)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    messages = parse_sse(response.text)
    assert messages[0] == {"retry": "3000"}
    progress = messages[1:-1]
    assert [message["id"] for message in progress] == ["1", "2", "3"]
    first = json.loads(progress[0]["data"])
    assert first["seq"] == 1 and first["stage"] == "training" and first["step"] == 1
    assert messages[-1]["event"] == "end"
    assert json.loads(messages[-1]["data"]) == {"job_id": job_id, "status": "completed", "error": None}


async def test_events_resume_after_last_event_id_or_after_query(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = await _job_with_events(upstream, "local:alice", 5)
    resumed = await gateway.client.get(
        f"/api/jobs/{job_id}/events", headers={**headers, "Last-Event-ID": "3"}
    )
    assert [m.get("id") for m in parse_sse(resumed.text) if "id" in m] == ["4", "5"]
    assert upstream.scheduler.watch_requests[-1].after_seq == 3

    by_query = await gateway.client.get(f"/api/jobs/{job_id}/events?after=2", headers=headers)
    assert [m.get("id") for m in parse_sse(by_query.text) if "id" in m] == ["3", "4", "5"]

    bad = await gateway.client.get(f"/api/jobs/{job_id}/events", headers={**headers, "Last-Event-ID": "abc"})
    assert bad.status_code == 422


async def test_events_send_heartbeats_while_idle_and_follow_new_events(make_gateway, upstream) -> None:
    gateway = await make_gateway(gateway_sse_heartbeat_s=0.05)
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    lines: list[str] = []
    async with gateway.client.stream("GET", f"/api/jobs/{job_id}/events", headers=headers) as response:
        async for line in response.aiter_lines():
            lines.append(line)
            if line == ": heartbeat" and lines.count(": heartbeat") == 1:
                # Only once the idle stream has proven alive does the job move on.
                await upstream.scheduler.add_event(job_id, "training", 0.9, step=7)
                await upstream.scheduler.finish(job_id, {})
    text = "\n".join(lines)
    messages = parse_sse(text)
    assert [m["id"] for m in messages if "id" in m] == ["1"]
    assert messages[-1]["event"] == "end"


async def test_events_stream_ends_when_client_disconnects(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    await upstream.scheduler.add_event(job_id, "loading_model", 0.01)
    async with gateway.client.stream("GET", f"/api/jobs/{job_id}/events", headers=headers) as response:
        async for line in response.aiter_lines():
            if line.startswith("id: 1"):
                break
    # The gateway cancels its WatchJob call; the job itself is untouched and still running.
    await asyncio.wait_for(_until_no_watchers(upstream), timeout=5)
    assert upstream.scheduler.jobs[job_id].job.state == common_pb2.JOB_STATE_RUNNING


async def _until_no_watchers(upstream: Any) -> None:
    async with upstream.scheduler.watchers_changed:
        await upstream.scheduler.watchers_changed.wait_for(lambda: upstream.scheduler.active_watchers == 0)


async def test_artifacts_are_listed_streamed_or_redirected_for_the_owner_only(gateway, upstream) -> None:
    import hashlib

    alice = await gateway.sign_in("alice")
    bob = await gateway.sign_in("bob")
    job_id = upstream.scheduler.add_job("local:alice")
    scores = bytes(range(256)) * 20
    upstream.scheduler.jobs[job_id].artifacts = {"scores.npy": scores, "adapter/adapter_config.json": b"{}"}

    listed = await gateway.client.get(f"/api/jobs/{job_id}/artifacts", headers=alice)
    assert listed.status_code == 200
    assert listed.json()["artifacts"][0] == {
        "name": "scores.npy",
        "bytes": len(scores),
        "sha256": hashlib.sha256(scores).hexdigest(),
        "media_type": "application/x-npy",
    }
    download = await gateway.client.get(f"/api/jobs/{job_id}/artifacts/scores.npy", headers=alice)
    assert download.status_code == 200 and download.content == scores
    assert download.headers["content-length"] == str(len(scores))
    assert download.headers["content-disposition"] == 'attachment; filename="scores.npy"'
    config_path = f"/api/jobs/{job_id}/artifacts/adapter/adapter_config.json"
    nested = await gateway.client.get(config_path, headers=alice)
    assert nested.status_code == 200 and nested.content == b"{}"

    upstream.scheduler.jobs[
        job_id
    ].download_url = "https://bucket.example/jobs/x/scores.npy?X-Amz-Signature=s"
    redirect = await gateway.client.get(
        f"/api/jobs/{job_id}/artifacts/scores.npy", headers=alice, follow_redirects=False
    )
    assert redirect.status_code == 307
    assert redirect.headers["location"] == upstream.scheduler.jobs[job_id].download_url

    for method, path in [
        ("GET", f"/api/jobs/{job_id}/artifacts"),
        ("GET", f"/api/jobs/{job_id}/artifacts/scores.npy"),
        ("GET", f"/api/jobs/{job_id}/artifacts/adapter/adapter_config.json"),
        ("DELETE", f"/api/jobs/{job_id}"),
    ]:
        response = await gateway.client.request(method, path, headers=bob)
        assert response.status_code == 404, path
        assert "scores" not in response.text
    missing = await gateway.client.get(f"/api/jobs/{job_id}/artifacts/other.npy", headers=alice)
    assert missing.status_code == 404 and missing.json()["detail"] == "Job or artifact not found"

    deleted = await gateway.client.delete(f"/api/jobs/{job_id}", headers=alice)
    assert deleted.status_code == 200
    assert deleted.json() == {"id": job_id, "deleted": True, "deleted_artifacts": 2}
    assert (await gateway.client.get(f"/api/jobs/{job_id}", headers=alice)).status_code == 404


async def test_a_store_outage_is_a_503_that_names_the_artifact_store(gateway, upstream) -> None:
    alice = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    upstream.scheduler.jobs[job_id].artifacts = {"scores.npy": b"x"}
    failure = "the artifact store failed to read 'jobs/x/scores.npy': connection refused"
    upstream.scheduler.store_failure = failure
    response = await gateway.client.get(f"/api/jobs/{job_id}/artifacts/scores.npy", headers=alice)
    assert response.status_code == 503
    assert response.json()["detail"].startswith("The artifact store failed to read")

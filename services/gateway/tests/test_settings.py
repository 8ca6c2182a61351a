"""Compute settings and the RunPod key: verify -> store -> switch, and the key never shows."""

from __future__ import annotations

import logging

import grpc
import pytest

from influence.v1 import common_pb2, scheduler_pb2

API_KEY = "rpa_ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789wxyz"
NO_FUNDS = "Your RunPod balance is $0; add credits at runpod.io"
NO_SCOPE = "This RunPod API key lacks a permission the dashboard needs: serverless Read/Write."
UNREACHABLE = "Cannot reach RunPod (api.runpod.io): ConnectError"
WORDY = "Invalid key: no balance, credit, funds or permission could be checked"


def refusal(failure: int, message: str) -> scheduler_pb2.VerifyProviderKeyResponse:
    return scheduler_pb2.VerifyProviderKeyResponse(valid=False, failure=failure, message=message)


def accept_with_balance(balance: float):
    async def verify(api_key: str) -> scheduler_pb2.VerifyProviderKeyResponse:
        return scheduler_pb2.VerifyProviderKeyResponse(valid=True, balance_usd=balance)

    return verify


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(f"{record.getMessage()} {record.__dict__}" for record in caplog.records)


async def test_save_key_verifies_stores_and_switches(gateway, upstream, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    headers = await gateway.sign_in("alice")
    upstream.scheduler.verify_answer = accept_with_balance(12.5)
    saved = await gateway.client.post("/api/settings/runpod-key", json={"api_key": API_KEY}, headers=headers)
    responses = [saved]
    assert saved.status_code == 200, saved.text
    assert saved.json() == {
        "last4": "wxyz",
        "backend": "runpod",
        "endpoint_status": "none",
        "balance_usd": 12.5,
        "message": "",
    }

    verify = upstream.scheduler.verify_requests[-1]
    assert (verify.user_id, verify.provider, verify.api_key) == ("local:alice", "runpod", API_KEY)
    store = upstream.keyvault.store_requests[-1]
    assert (store.user_id, store.provider, store.plaintext, store.verified) == (
        "local:alice",
        "runpod",
        API_KEY,
        True,
    )
    assert upstream.scheduler.backends["local:alice"] == "runpod"

    responses.append(await gateway.client.get("/api/settings/runpod-key", headers=headers))
    info = responses[-1].json()
    assert info["has_key"] is True and info["last4"] == "wxyz" and info["backend"] == "runpod"
    assert info["verified_at"] is not None and info["endpoint_status"] == "none"

    responses.append(await gateway.client.delete("/api/settings/runpod-key", headers=headers))
    assert responses[-1].json()["backend"] == "hosted" and responses[-1].json()["deleted"] is True
    assert ("local:alice", "runpod") not in upstream.keyvault.keys
    assert upstream.scheduler.backends["local:alice"] == "hosted"
    responses.append(await gateway.client.get("/api/settings/runpod-key", headers=headers))
    assert responses[-1].json()["has_key"] is False

    for response in responses:
        assert API_KEY not in response.text
    assert caplog.records, "the gateway logs what it does"
    assert API_KEY not in _everything_logged(caplog)
    assert API_KEY[4:20] not in _everything_logged(caplog)


async def test_removing_the_key_with_runpod_jobs_active_is_409_or_cancels_them_first(
    gateway, upstream
) -> None:
    headers = await gateway.sign_in("rita")
    upstream.scheduler.verify_answer = accept_with_balance(5.0)
    saved = await gateway.client.post("/api/settings/runpod-key", json={"api_key": API_KEY}, headers=headers)
    assert saved.status_code == 200, saved.text
    running = upstream.scheduler.add_job("local:rita")
    upstream.scheduler.jobs[running].job.compute_backend = "runpod"
    hosted = upstream.scheduler.add_job("local:rita")  # a hosted job does not need the key

    refused = await gateway.client.delete("/api/settings/runpod-key", headers=headers)
    assert refused.status_code == 409
    assert running in refused.json()["detail"] and hosted not in refused.json()["detail"]
    assert "cancel_jobs=true" in refused.json()["detail"]
    # Nothing changed: the key is kept and the backend is still runpod.
    assert ("local:rita", "runpod") in upstream.keyvault.keys
    assert upstream.scheduler.backends["local:rita"] == "runpod"
    assert upstream.scheduler.jobs[running].job.state == common_pb2.JOB_STATE_RUNNING

    removed = await gateway.client.delete("/api/settings/runpod-key?cancel_jobs=true", headers=headers)
    assert removed.status_code == 200, removed.text
    assert removed.json()["deleted"] is True and removed.json()["backend"] == "hosted"
    assert upstream.scheduler.jobs[running].job.state == common_pb2.JOB_STATE_CANCELLED
    assert upstream.scheduler.jobs[hosted].job.state == common_pb2.JOB_STATE_RUNNING
    assert ("local:rita", "runpod") not in upstream.keyvault.keys


async def test_replacing_the_key_with_runpod_jobs_active_is_409_or_cancels_them_first(
    gateway, upstream
) -> None:
    """A job is followed and cancelled with the key it was submitted with: a new key (perhaps
    another account's) is stored only once no job runs on RunPod, else the answer names them."""
    headers = await gateway.sign_in("rowan")
    upstream.scheduler.verify_answer = accept_with_balance(5.0)
    saved = await gateway.client.post("/api/settings/runpod-key", json={"api_key": API_KEY}, headers=headers)
    assert saved.status_code == 200, saved.text
    running = upstream.scheduler.add_job("local:rowan")
    upstream.scheduler.jobs[running].job.compute_backend = "runpod"
    other_key = "rpa_ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210abcd"

    refused = await gateway.client.post(
        "/api/settings/runpod-key", json={"api_key": other_key}, headers=headers
    )
    assert refused.status_code == 409
    assert running in refused.json()["detail"] and "cancel_jobs=true" in refused.json()["detail"]
    assert "not replaced" in refused.json()["detail"]
    # Nothing changed: the old key is kept, the backend is runpod again, the job runs on.
    assert upstream.keyvault.keys[("local:rowan", "runpod")] == API_KEY
    assert upstream.scheduler.backends["local:rowan"] == "runpod"
    assert upstream.scheduler.jobs[running].job.state == common_pb2.JOB_STATE_RUNNING

    replaced = await gateway.client.post(
        "/api/settings/runpod-key?cancel_jobs=true", json={"api_key": other_key}, headers=headers
    )
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["last4"] == "abcd" and replaced.json()["backend"] == "runpod"
    assert upstream.scheduler.jobs[running].job.state == common_pb2.JOB_STATE_CANCELLED
    assert upstream.keyvault.keys[("local:rowan", "runpod")] == other_key
    for response in (saved, refused, replaced):
        assert API_KEY not in response.text and other_key not in response.text


@pytest.mark.parametrize(
    ("scheduler_answer", "status", "message"),
    [
        (grpc.StatusCode.UNAUTHENTICATED, 400, "Invalid RunPod API key"),
        (grpc.StatusCode.PERMISSION_DENIED, 403, "The key lacks the scope api.serverless: read/write"),
        (refusal(common_pb2.KEY_FAILURE_INVALID, "Invalid RunPod API key"), 400, "Invalid RunPod API key"),
        (refusal(common_pb2.KEY_FAILURE_NO_FUNDS, NO_FUNDS), 402, NO_FUNDS),
        (refusal(common_pb2.KEY_FAILURE_NO_PERMISSION, NO_SCOPE), 403, NO_SCOPE),
        (refusal(common_pb2.KEY_FAILURE_UNREACHABLE, UNREACHABLE), 503, UNREACHABLE),
        # The reason decides, never the words: these mention a balance and a permission.
        (refusal(common_pb2.KEY_FAILURE_INVALID, WORDY), 400, WORDY),
        (refusal(common_pb2.KEY_FAILURE_UNSPECIFIED, WORDY), 400, WORDY),
        (refusal(common_pb2.KEY_FAILURE_NO_FUNDS, ""), 402, "RunPod rejected the key"),
    ],
)
async def test_rejected_key_gets_the_providers_message_and_nothing_is_stored(
    gateway,
    upstream,
    caplog,
    scheduler_answer,
    status,
    message,
) -> None:
    caplog.set_level(logging.DEBUG)
    headers = await gateway.sign_in("alice")
    upstream.scheduler.answer_verification(scheduler_answer, message)
    body = {"api_key": API_KEY}
    response = await gateway.client.post("/api/settings/runpod-key", json=body, headers=headers)
    assert response.status_code == status
    assert response.json() == {"detail": message}
    assert upstream.keyvault.keys == {}
    assert "local:alice" not in upstream.scheduler.backends
    assert API_KEY not in _everything_logged(caplog)


async def test_key_is_not_echoed_on_bad_input_or_outages(gateway, upstream, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    headers = await gateway.sign_in("alice")
    upstream.scheduler.verify_answer = accept_with_balance(5)
    bad = await gateway.client.post(
        "/api/settings/runpod-key", json={"api_key": API_KEY + " " + API_KEY}, headers=headers
    )
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "api_key"
    extra = await gateway.client.post(
        "/api/settings/runpod-key", json={"api_key": API_KEY, "apikey": API_KEY}, headers=headers
    )
    assert extra.status_code == 422

    await upstream.keyvault_service.server.stop(None)
    down = await gateway.client.post("/api/settings/runpod-key", json={"api_key": API_KEY}, headers=headers)
    assert down.status_code == 503
    assert down.json() == {"detail": "The key vault is unavailable; your key was not saved, try again"}
    assert "local:alice" not in upstream.scheduler.backends
    for response in (bad, extra, down):
        assert API_KEY not in response.text
    assert API_KEY not in _everything_logged(caplog)


async def test_runpod_backend_needs_a_stored_key(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    refused = await gateway.client.put("/api/settings/compute", json={"backend": "runpod"}, headers=headers)
    assert refused.status_code == 409
    assert "No RunPod API key is stored" in refused.json()["detail"]
    assert "local:alice" not in upstream.scheduler.backends

    upstream.keyvault.keys[("local:alice", "runpod")] = API_KEY
    chosen = await gateway.client.put("/api/settings/compute", json={"backend": "runpod"}, headers=headers)
    assert chosen.status_code == 200 and chosen.json()["backend"] == "runpod"
    current = await gateway.client.get("/api/settings/compute", headers=headers)
    assert current.json() == {
        "backend": "runpod",
        "hosted_provider": "local",
        "runpod_endpoint_id": None,
        "endpoint_status": "none",
        "endpoint_error": None,
    }
    back = await gateway.client.put("/api/settings/compute", json={"backend": "hosted"}, headers=headers)
    assert back.json()["backend"] == "hosted"


async def test_wrong_keyvault_token_is_an_operator_error_not_the_users(make_gateway, upstream) -> None:
    gateway = await make_gateway(keyvault_token="not-the-token-keyvault-knows")
    headers = await gateway.sign_in("alice")
    response = await gateway.client.get("/api/settings/runpod-key", headers=headers)
    assert response.status_code == 503
    assert "key vault" in response.json()["detail"]


async def test_one_request_carries_one_trace_to_scheduler_and_keyvault(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    upstream.scheduler.verify_answer = accept_with_balance(3.0)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    for extra in ({"traceparent": traceparent}, {}):
        saved = await gateway.client.post(
            "/api/settings/runpod-key", json={"api_key": API_KEY}, headers={**headers, **extra}
        )
        assert saved.status_code == 200, saved.text
        verified = upstream.scheduler.metadata_seen[-1]["traceparent"]
        stored = upstream.keyvault.metadata_seen[-1]
        # A request without a trace starts one; both services see the same one either way.
        assert stored["traceparent"] == verified == extra.get("traceparent", verified)
        assert stored["x-caller-token"] and "x-caller-token" not in upstream.scheduler.metadata_seen[-1]


async def test_a_key_that_cannot_travel_in_a_header_is_a_422_not_a_502(gateway, upstream) -> None:
    """The fuzz finding: a generated key with a non-ASCII character reached compute-runpod,
    whose HTTP client could not put it in RunPod's Authorization header (UnicodeEncodeError),
    and the answer was a 502 from the scheduler. Such keys are refused here, before any call."""
    headers = await gateway.sign_in("alice")
    for key in ("rpa_\u00e9t\u00e9", "rpa_\u2028abc", "rpa_a\x00b", "rpa_\x7fabc", "rpa_\u00a0abc"):
        answer = await gateway.client.post("/api/settings/runpod-key", json={"api_key": key}, headers=headers)
        assert answer.status_code == 422, (repr(key), answer.text)
        (problem,) = answer.json()["detail"]
        assert problem["field"] == "api_key" and "printable ASCII" in problem["message"]
        assert key not in answer.text
    assert upstream.scheduler.verify_requests == []


async def test_the_endpoint_is_shown_and_deleted_only_when_no_runpod_job_would_be_cut_off(
    gateway, upstream
) -> None:
    headers = await gateway.sign_in("enid")
    upstream.scheduler.verify_answer = accept_with_balance(5.0)
    saved = await gateway.client.post("/api/settings/runpod-key", json={"api_key": API_KEY}, headers=headers)
    assert saved.status_code == 200, saved.text
    upstream.scheduler.endpoints["local:enid"] = "ep-1"
    shown = (await gateway.client.get("/api/settings/runpod-endpoint", headers=headers)).json()
    assert (shown["state"], shown["endpoint_id"], shown["gpu_pools"]) == ("live", "ep-1", ["AMPERE_80"])
    assert shown["console_url"].endswith("/ep-1") and shown["workers"]["total"] == 0

    running = upstream.scheduler.add_job("local:enid")
    upstream.scheduler.jobs[running].job.compute_backend = "runpod"
    refused = await gateway.client.delete("/api/settings/runpod-endpoint", headers=headers)
    assert refused.status_code == 409 and running in refused.json()["detail"]
    assert "The endpoint was not deleted" in refused.json()["detail"]
    assert upstream.scheduler.endpoint_deletes == []
    deleted = await gateway.client.delete("/api/settings/runpod-endpoint?cancel_jobs=true", headers=headers)
    assert deleted.status_code == 200 and deleted.json()["state"] == "none"
    assert upstream.scheduler.endpoint_deletes == ["ep-1"]
    assert upstream.scheduler.jobs[running].job.state == common_pb2.JOB_STATE_CANCELLED

    # Removing the key may delete the endpoint too, while the key can still reach it.
    upstream.scheduler.endpoints["local:enid"] = "ep-2"
    removed = await gateway.client.delete("/api/settings/runpod-key?delete_endpoint=true", headers=headers)
    assert removed.status_code == 200, removed.text
    assert removed.json()["endpoint_deleted"] is True and removed.json()["runpod_endpoint_id"] is None
    assert upstream.scheduler.endpoint_deletes == ["ep-1", "ep-2"]
    assert ("local:enid", "runpod") not in upstream.keyvault.keys

    # Without a key there is nothing to delete it with; kept without asking, it is "unknown".
    upstream.scheduler.endpoints["local:enid"] = "ep-3"
    no_key = await gateway.client.delete("/api/settings/runpod-endpoint", headers=headers)
    assert no_key.status_code == 409 and "RunPod's console" in no_key.json()["detail"]
    unseen = (await gateway.client.get("/api/settings/runpod-endpoint", headers=headers)).json()
    assert (unseen["state"], unseen["endpoint_id"], unseen["workers"]) == ("unknown", "ep-3", None)


async def test_runpods_webhook_is_forwarded_without_a_session_only_with_the_jobs_secret(
    gateway, upstream
) -> None:
    """RunPod posts without any session: the per-job secret in the URL is the credential, and a
    wrong one (or an unknown job) is a 404 that says nothing more."""
    job_id = upstream.scheduler.add_job("local:wren")
    upstream.scheduler.webhook_secrets[job_id] = "s3cret-of-the-job"
    body = {"id": "runpod-1", "status": "COMPLETED", "output": [{"forged": True}]}

    woken = await gateway.client.post(f"/api/webhooks/runpod/{job_id}/s3cret-of-the-job", json=body)
    assert woken.status_code == 200 and upstream.scheduler.woken == [job_id]
    for path in (
        f"/api/webhooks/runpod/{job_id}/s3cret-of-the-joB",
        "/api/webhooks/runpod/job-999/s3cret-of-the-job",
        f"/api/webhooks/runpod/{job_id}/",
    ):
        refused = await gateway.client.post(path, json=body)
        assert refused.status_code == 404, path
        assert refused.json() in ({"detail": "Not found"}, {"detail": "Not Found"}), refused.text
    assert upstream.scheduler.woken == [job_id]
    assert upstream.scheduler.jobs[job_id].job.state == common_pb2.JOB_STATE_RUNNING
    schema = (await gateway.client.get("/openapi.json")).json()
    assert not any(path.startswith("/api/webhooks") for path in schema["paths"])


async def test_a_workers_upload_request_is_forwarded_without_a_session_and_refusals_keep_their_meaning(
    gateway, upstream
) -> None:
    """POST /api/uploads/{job}/{secret}: the worker's per-job secret is the credential; each of the
    scheduler's refusals keeps its meaning (a size over the limits is a 413), and none repeats it."""
    secret = "upl0ad-s3cret-of-the-job"
    sha = "ab" * 32
    body = {"name": "scores.npy", "bytes": 4096, "sha256": sha}
    granted = await gateway.client.post(f"/api/uploads/job-7/{secret}", json=body)
    assert granted.status_code == 200, granted.text
    assert granted.json()["headers"] == {"Content-Length": "4096", "If-None-Match": "*"}
    assert granted.json()["url"].startswith("https://store.example/jobs/job-7/scores.npy?")
    (sent,) = upstream.scheduler.upload_requests
    assert (sent.job_id, sent.secret, sent.name, sent.bytes, sent.sha256) == (
        "job-7",
        secret,
        "scores.npy",
        4096,
        sha,
    )
    for code, status in (
        (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.FAILED_PRECONDITION, 409),
        (grpc.StatusCode.INVALID_ARGUMENT, 422),
        (grpc.StatusCode.OUT_OF_RANGE, 413),
    ):
        upstream.scheduler.upload_refusal = (code, "the scheduler's reason")
        refused = await gateway.client.post(f"/api/uploads/job-7/{secret}", json=body)
        assert refused.status_code == status, (code, refused.text)
        assert secret not in refused.text
    asked = len(upstream.scheduler.upload_requests)
    for bad in (
        {**body, "sha256": "xyz"},
        {**body, "bytes": -1},
        {**body, "url": "x"},
        {"name": "scores.npy"},
    ):
        assert (await gateway.client.post(f"/api/uploads/job-7/{secret}", json=bad)).status_code == 422
    assert len(upstream.scheduler.upload_requests) == asked  # refused before the scheduler
    schema = (await gateway.client.get("/openapi.json")).json()
    assert not any(path.startswith("/api/uploads") for path in schema["paths"])

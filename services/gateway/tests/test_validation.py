"""Bad input gets a clear 4xx naming what is wrong, before anything reaches the scheduler."""

from __future__ import annotations

import json


async def test_malformed_json_is_400_with_a_plain_message(gateway, upstream) -> None:
    headers = {**await gateway.sign_in("alice"), "Content-Type": "application/json"}
    response = await gateway.client.post("/api/train", content=b'{"training_data": [', headers=headers)
    assert response.status_code == 400
    assert response.json()["detail"].startswith("The request body is not valid JSON")
    empty = await gateway.client.post("/api/train", content=b"", headers=headers)
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    put = await gateway.client.put("/api/settings/compute", content=b"{backend:", headers=headers)
    assert put.status_code == 400 and "not valid JSON" in put.json()["detail"]
    assert upstream.scheduler.submit_requests == []


async def test_wrong_types_name_the_field(gateway, upstream, make_spec) -> None:
    headers = await gateway.sign_in("alice")
    spec = make_spec(n_train=4)
    spec["training_data"][3]["completion"] = ""
    spec["training_data"][1]["prompt"] = 42
    spec["hyperparams"]["epochs"] = "three"
    response = await gateway.client.post("/api/train", json=spec, headers=headers)
    assert response.status_code == 422
    problems = {problem["field"]: problem["message"] for problem in response.json()["detail"]}
    assert set(problems) == {"training_data[3].completion", "training_data[1].prompt", "hyperparams.epochs"}
    assert "at least 1 character" in problems["training_data[3].completion"]
    assert upstream.scheduler.submit_requests == []


async def test_unknown_fields_and_whole_body_errors(gateway, make_spec) -> None:
    headers = await gateway.sign_in("alice")
    spec = {**make_spec(), "backend": "runpod"}
    response = await gateway.client.post("/api/train", json=spec, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"] == [{"field": "backend", "message": "Extra inputs are not permitted"}]

    not_object = await gateway.client.post("/api/train", json=[1, 2], headers=headers)
    assert not_object.status_code == 422
    assert not_object.json()["detail"][0]["field"] == "body"


async def test_limits_from_settings(make_gateway, make_spec) -> None:
    gateway = await make_gateway(
        gateway_max_train_examples=3, gateway_max_eval_examples=2, gateway_max_text_chars=10
    )
    headers = await gateway.sign_in("alice")
    too_many = await gateway.client.post("/api/train", json=make_spec(n_train=4), headers=headers)
    assert too_many.status_code == 422
    assert too_many.json()["detail"] == [
        {"field": "training_data", "message": "has 4 examples; the limit is 3"}
    ]
    spec = make_spec()
    spec["eval_data"][0]["prompt"] = "x" * 11
    too_long = await gateway.client.post("/api/estimate", json=spec, headers=headers)
    assert too_long.json()["detail"] == [
        {"field": "eval_data[0].prompt", "message": "text is 11 characters; the limit is 10"}
    ]


async def test_oversized_body_is_413_before_parsing(make_gateway, upstream, make_spec) -> None:
    gateway = await make_gateway(gateway_max_body_bytes=2048)
    headers = await gateway.sign_in("alice")
    spec = make_spec()
    spec["training_data"][0]["prompt"] = "x" * 4000
    response = await gateway.client.post("/api/train", json=spec, headers=headers)
    assert response.status_code == 413
    assert "2048 bytes" in response.json()["detail"]

    async def chunks():  # no Content-Length: the limit applies while streaming
        body = json.dumps(spec).encode()
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    streamed = await gateway.client.post(
        "/api/train", content=chunks(), headers={**headers, "Content-Type": "application/json"}
    )
    assert streamed.status_code == 413
    assert upstream.scheduler.submit_requests == []
    # Also on a route whose body FastAPI parses into a model.
    key_body = json.dumps({"api_key": "k" * 4000}).encode()

    async def key_chunks():
        yield key_body[:1500]
        yield key_body[1500:]

    streamed_key = await gateway.client.post(
        "/api/settings/runpod-key",
        content=key_chunks(),
        headers={**headers, "Content-Type": "application/json"},
    )
    assert streamed_key.status_code == 413
    assert streamed_key.json()["detail"] == "The request body is larger than the limit of 2048 bytes"
    assert upstream.scheduler.verify_requests == []
    # A body under the limit still goes through.
    assert (await gateway.client.post("/api/train", json=make_spec(), headers=headers)).status_code == 202


async def test_unknown_backend_is_422_naming_the_field(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    response = await gateway.client.put("/api/settings/compute", json={"backend": "aws"}, headers=headers)
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["field"] == "backend" and "'hosted' or 'runpod'" in problem["message"]
    missing = await gateway.client.put("/api/settings/compute", json={}, headers=headers)
    assert missing.json()["detail"] == [{"field": "backend", "message": "Field required"}]
    assert upstream.scheduler.backends == {}


async def test_bad_idempotency_key_is_422(gateway, make_spec) -> None:
    headers = {**await gateway.sign_in("alice"), "Idempotency-Key": "has spaces"}
    response = await gateway.client.post("/api/train", json=make_spec(), headers=headers)
    assert response.status_code == 422 and "Idempotency-Key" in response.json()["detail"]


async def test_text_protobuf_cannot_carry_is_422_naming_the_field(gateway, upstream, make_spec) -> None:
    headers = {**await gateway.sign_in("alice"), "Content-Type": "application/json"}
    body = json.dumps(make_spec()).replace('"q1"', '"q\\ud800"').encode()
    for route in ("/api/train", "/api/estimate"):
        response = await gateway.client.post(route, content=body, headers=headers)
        assert response.status_code == 422, response.text
        [problem] = response.json()["detail"]
        assert problem["field"] == "training_data[1].prompt"
        assert "lone surrogate (U+D800" in problem["message"]
    model = json.dumps({**make_spec(), "model_id": "m"}).replace('"m"', '"\\udc00x"').encode()
    response = await gateway.client.post("/api/train", content=model, headers=headers)
    assert response.json()["detail"][0]["field"] == "model_id"
    key = await gateway.client.post(
        "/api/settings/runpod-key", content=b'{"api_key": "rpa_\\ud83dKEY"}', headers=headers
    )
    assert key.status_code == 422
    assert key.json()["detail"][0]["field"] == "api_key"
    assert "lone surrogate" in key.json()["detail"][0]["message"]
    assert upstream.scheduler.submit_requests == [] and upstream.scheduler.verify_requests == []
    assert upstream.scheduler.estimate_requests == []


async def test_integer_query_parameters_are_bounded(gateway, upstream) -> None:
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    huge = await gateway.client.get(
        f"/api/jobs/{job_id}/events", params={"after": "2376703007378839699456"}, headers=headers
    )
    assert huge.status_code == 422
    assert huge.json()["detail"][0]["field"] == "after"
    resumed = await gateway.client.get(
        f"/api/jobs/{job_id}/events", headers={**headers, "Last-Event-ID": "9" * 30}
    )
    assert resumed.status_code == 422 and "Last-Event-ID" in resumed.json()["detail"]
    superscript = await gateway.client.get(
        f"/api/jobs/{job_id}/events", headers={**headers, "Last-Event-ID": "\u00b2".encode("latin-1")}
    )
    assert superscript.status_code == 422
    assert upstream.scheduler.watch_requests == []


async def test_a_runpod_gpu_that_is_unknown_or_too_small_for_the_model_is_422_naming_it(
    gateway, upstream, make_spec
) -> None:
    """Issue 24 item 7: the GPU pool a job is pinned to must exist and hold the model; the picker's
    list (GET /api/models/runpod-gpus) is exactly the pools that do."""
    headers = await gateway.sign_in("alice")
    listed = await gateway.client.get(
        "/api/models/runpod-gpus",
        params={"model_id": "google/gemma-3-27b", "quantization": "4bit"},
        headers=headers,
    )
    assert listed.status_code == 200
    pools = [gpu["pool"] for gpu in listed.json()["gpus"]]
    assert pools[0] == "AMPERE_48" and "AMPERE_16" not in pools and "ADA_24" not in pools

    cases = {
        "AMPERE_16": "AMPERE_16 (16 GB) is too small for google/gemma-3-27b at quantization 4bit",
        "TPU_9000": "TPU_9000 is not a RunPod GPU pool this dashboard knows",
    }
    for path in ("/api/train", "/api/estimate"):
        for pool, message in cases.items():
            spec = {**make_spec(), "model_id": "google/gemma-3-27b", "runpod_gpu": pool}
            spec["hyperparams"]["quantization"] = "4bit"
            response = await gateway.client.post(path, json=spec, headers=headers)
            assert response.status_code == 422, (path, pool)
            (problem,) = response.json()["detail"]
            assert problem["field"] == "runpod_gpu" and problem["message"].startswith(message), problem
            assert "AMPERE_48" in problem["message"]  # names the pools that fit
    assert upstream.scheduler.submit_requests == []

    fits = {**make_spec(), "model_id": "google/gemma-3-27b", "runpod_gpu": "AMPERE_80"}
    fits["hyperparams"]["quantization"] = "4bit"
    accepted = await gateway.client.post("/api/train", json=fits, headers=headers)
    assert accepted.status_code == 202
    (sent,) = upstream.scheduler.submit_requests
    assert json.loads(sent.spec_json)["runpod_gpu"] == "AMPERE_80"

"""/openapi.json describes every answer: each 2xx JSON response names a schema with fields, and
each error response is the one documented error shape."""

from __future__ import annotations

from typing import Any

from gateway.app import create_app
from gateway.config import Settings
from influence_client import models

ERROR_REF = "#/components/schemas/ErrorResponse"
# Answers that are not the error shape on purpose: readiness says which dependency is down.
NON_ERROR_SHAPES = {("/readyz", "get", "503")}


def _document() -> dict[str, Any]:
    return create_app(Settings.load(auth_mode="local")).openapi()


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    name = ref.removeprefix("#/components/schemas/")
    assert name in document["components"]["schemas"], f"{ref} is not in the document's components"
    return document["components"]["schemas"][name]


def _named_fields(document: dict[str, Any], schema: dict[str, Any]) -> bool:
    """A schema that says what the answer holds: a named model with properties (or a list of
    them). A bare ``{}`` or ``{"type": "object", "additionalProperties": true}`` says nothing."""
    if "$ref" not in schema:
        return schema.get("type") == "array" and _named_fields(document, schema.get("items", {}))
    return bool(_resolve(document, schema).get("properties"))


def _operations(document: dict[str, Any]):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                yield path, method, status, response


def test_every_2xx_json_response_has_a_schema_with_fields() -> None:
    document = _document()
    missing = []
    checked = 0
    for path, method, status, response in _operations(document):
        if not status.startswith("2"):
            continue
        content = response.get("content", {})
        if status == "204" and not content:
            continue
        for media_type, body in content.items():
            if "json" not in media_type:
                continue
            checked += 1
            if not _named_fields(document, body.get("schema", {})):
                missing.append(f"{method.upper()} {path} {status} {media_type}: {body.get('schema')}")
        if not content:
            missing.append(f"{method.upper()} {path} {status}: no content declared")
    assert not missing, "2xx JSON responses without a schema:\n" + "\n".join(missing)
    assert checked >= 15


def test_every_error_response_is_the_error_shape() -> None:
    document = _document()
    wrong = []
    for path, method, status, response in _operations(document):
        # 2xx answers are checked above; a 3xx redirect has no body.
        if status[0] in "23" or (path, method, status) in NON_ERROR_SHAPES:
            continue
        schema = response.get("content", {}).get("application/json", {}).get("schema", {})
        if schema.get("$ref") != ERROR_REF:
            wrong.append(f"{method.upper()} {path} {status}: {schema}")
    assert not wrong, "error responses without the ErrorResponse schema:\n" + "\n".join(wrong)
    # FastAPI's own 422 shape (loc/msg/type) is not what the gateway answers.
    assert "HTTPValidationError" not in document["components"]["schemas"]


def test_the_error_shape_documents_a_sentence_or_field_problems() -> None:
    schema = _document()["components"]["schemas"]["ErrorResponse"]
    variants = schema["properties"]["detail"]["anyOf"]
    assert {"type": "string"} in variants
    assert {"type": "array", "items": {"$ref": "#/components/schemas/FieldProblem"}} in variants
    models.ErrorResponse.model_validate({"detail": [{"field": "eval_data", "message": "is empty"}]})


def test_the_event_stream_documents_its_event_objects() -> None:
    document = _document()
    events = document["paths"]["/api/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    schema = _resolve(document, events["text/event-stream"]["schema"])
    assert {"type", "seq", "stage", "progress"} <= set(schema["properties"])
    assert "StreamEnd" in document["components"]["schemas"]


async def test_answers_match_their_documented_models(gateway, upstream, make_spec) -> None:
    """The views build what the models declare: each answer parses as its model, field for field."""
    headers = await gateway.sign_in("alice")
    job_id = upstream.scheduler.add_job("local:alice")
    routes = {
        models.Job: f"/api/jobs/{job_id}",
        models.JobList: "/api/jobs",
        models.ComputeSettings: "/api/settings/compute",
        models.RunpodKeyStatus: "/api/settings/runpod-key",
        models.ModelList: "/api/models",
    }
    for model, route in routes.items():
        answer = (await gateway.client.get(route, headers=headers)).json()
        parsed = model.model_validate(answer)
        assert parsed.model_extra == {}, f"{model.__name__} misses fields the gateway sends"
        assert set(answer) == set(model.model_fields), model.__name__
    # The catalog's entries, field for field: the model copies cost_model's ModelInfo.
    catalog = (await gateway.client.get("/api/models", headers=headers)).json()["models"]
    assert set(catalog[0]) == set(models.ModelInfo.model_fields)
    assert set(catalog[0]["prices"]["hosted"]) == set(models.BackendPrice.model_fields)
    estimate = (await gateway.client.post("/api/estimate", json=make_spec(), headers=headers)).json()
    assert set(estimate["estimates"][0]) == set(models.BackendEstimate.model_fields)
    assert set(estimate) == set(models.EstimateAnswer.model_fields)
    assert set(estimate["data_report"]) == set(models.DataReport.model_fields)
    parsed = await gateway.client.post(
        "/api/data/parse",
        params={"kind": "train", "filename": "t.jsonl"},
        content=b'{"prompt": "a", "completion": "b"}\n',
        headers=headers,
    )
    assert set(parsed.json()) == set(models.ParsedDataFile.model_fields), parsed.text
    submitted = (await gateway.client.post("/api/train", json=make_spec(), headers=headers)).json()
    assert set(submitted) == set(models.SubmittedJob.model_fields)
    missing = await gateway.client.get("/api/jobs/nope", headers=headers)
    assert missing.status_code == 404
    assert models.ErrorResponse.model_validate(missing.json()).detail == "Job not found"

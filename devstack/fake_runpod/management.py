"""REST v2 endpoint management (``/v2/serverless``...) and templates (``/v2/templates/{id}``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from devstack.fake_runpod.state import EndpointState, json_body, problem, public_endpoint

if TYPE_CHECKING:
    from devstack.fake_runpod.fake import FakeRunPod


def add_management_routes(app: FastAPI, fake: FakeRunPod) -> None:
    """REST v2 serverless endpoints."""

    @app.get("/v2/serverless")
    async def list_endpoints(request: Request) -> Response:
        account = fake.gate(request, "serverless.list", manage=True)
        own = [
            public_endpoint(e.config)
            for e in fake.endpoint_states.values()
            if e.owner == account.key and not e.deleted
        ]
        return JSONResponse({"endpoints": own})

    @app.post("/v2/serverless")
    async def create_endpoint(request: Request) -> Response:
        account = fake.gate(request, "serverless.create", manage=True)
        body = await json_body(request)
        problem = validate_create(body, fake.templates)
        if problem is not None:
            return problem
        endpoint_id = uuid.uuid4().hex[:14]
        config = {
            "workers": {"min": 0, "max": 3, "idleTimeout": 10},
            "timeout": 300000,
            "flashboot": "OFF",
            **body,
            "id": endpoint_id,
            "createdAt": datetime.now(UTC).isoformat(),
            "requestUrls": {
                name: f"{fake.url}/v2/{endpoint_id}/{path}"
                for name, path in (
                    ("run", "run"),
                    ("runSync", "runsync"),
                    ("status", "status"),
                    ("stream", "stream"),
                    ("cancel", "cancel"),
                    ("retry", "retry"),
                    ("purgeQueue", "purge-queue"),
                    ("health", "health"),
                )
            },
        }
        fake.endpoint_states[endpoint_id] = EndpointState(config=config, owner=account.key)
        return JSONResponse(public_endpoint(config), status_code=201)

    @app.get("/v2/serverless/{endpoint_id}")
    async def get_endpoint(request: Request, endpoint_id: str) -> Response:
        account = fake.gate(request, "serverless.get", manage=True)
        return JSONResponse(public_endpoint(fake.own_endpoint(account, endpoint_id).config))

    @app.patch("/v2/serverless/{endpoint_id}")
    async def update_endpoint(request: Request, endpoint_id: str) -> Response:
        account = fake.gate(request, "serverless.update", manage=True)
        endpoint = fake.own_endpoint(account, endpoint_id)
        body = await json_body(request)
        fixed = {"id", "createdAt", "requestUrls", "templateId", "type"}
        if not isinstance(body, dict) or fixed & set(body):
            return problem(422, f"a PATCH may not change {', '.join(sorted(fixed))}")
        if "gpu" in body and not (body["gpu"] or {}).get("pools"):
            return problem(422, "gpu.pools must list at least one pool")
        if any(body.get(k) != endpoint.config.get(k) for k in ("image", "env", "args") if k in body):
            endpoint.release += 1
        endpoint.config.update(body)  # nested objects are replaced whole
        return JSONResponse(public_endpoint(endpoint.config))

    @app.get("/v2/templates/{template_id}")
    async def get_template(request: Request, template_id: str) -> Response:
        fake.gate(request, "templates.get", manage=True)
        template = fake.templates.get(template_id)
        if template is None:
            return problem(404, f"template {template_id} not found")
        return JSONResponse(template)

    @app.delete("/v2/serverless/{endpoint_id}")
    async def delete_endpoint(request: Request, endpoint_id: str) -> Response:
        account = fake.gate(request, "serverless.delete", manage=True)
        fake.own_endpoint(account, endpoint_id)
        fake.delete_endpoint(endpoint_id)
        return Response(status_code=204)

    @app.get("/v2/serverless/{endpoint_id}/workers")
    async def workers(request: Request, endpoint_id: str) -> Response:
        account = fake.gate(request, "serverless.workers", manage=True)
        endpoint = fake.own_endpoint(account, endpoint_id)
        busy = {worker.id for worker in endpoint.workers if fake.busy(worker)}
        summary = {
            "running": len(busy),
            "idle": sum(w.took_first_job and w.id not in busy for w in endpoint.workers),
            "initializing": sum(not w.took_first_job and w.id not in busy for w in endpoint.workers),
            "throttled": int(fake.throttled and bool(endpoint.queue)),
            "unhealthy": 0,
        }
        summary["total"] = sum(summary.values())
        listed = [{"id": w.id, "status": "RUNNING" if w.id in busy else "IDLE"} for w in endpoint.workers]
        return JSONResponse({"workers": listed, "summary": summary, "endpointVersion": 1})


def validate_create(body: Any, templates: dict[str, dict[str, Any]]) -> Response | None:
    if not isinstance(body, dict):
        return problem(422, "the body must be a JSON object")
    errors = [f"{name} is required" for name in ("name", "type", "scaling") if name not in body]
    if "image" not in body and "templateId" not in body:
        errors.append("image is required unless templateId is given")
    if ("gpu" in body) == ("cpu" in body):
        return problem(400, "exactly one of gpu or cpu must be given")
    if "gpu" in body and not (body["gpu"] or {}).get("pools"):
        errors.append("gpu.pools must list at least one pool")
    if errors:
        return problem(422, "the request does not match the schema", errors=errors)
    if "templateId" in body and body["templateId"] not in templates:
        return problem(404, f"template {body['templateId']} not found")
    return None

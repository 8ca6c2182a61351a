"""The FastAPI application: routes, auth, limits, error answers, health, dashboard (its metrics
registry is served on the internal metrics port by gateway.server)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import plotly
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field

from gateway import (
    config_api,
    counterfactual_api,
    curation_api,
    data_api,
    datasets_api,
    experiments_api,
    jobs_api,
    merges_api,
    models_api,
    queries_api,
    settings_api,
    tracking_api,
    uploads_api,
    usage_api,
    webhooks_api,
)
from gateway.auth import USERNAME_PATTERN, LocalTokenIssuer, TokenVerifier, local_secret
from gateway.config import LOOPBACK_HOSTS, Settings
from gateway.deps import GatewayState, SpecInvalid, json_error, validation_problems
from gateway.middleware import BodySizeLimit, RequestMetrics
from gateway.responses import ERRORS, error
from gateway.upstream import ApiError, Upstreams, open_upstreams
from influence_client.models import AccessToken, Health, JobEvent, Readiness, StreamEnd

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


class LocalSignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(
        pattern=USERNAME_PATTERN.pattern,
        description="1-64 letters, digits or . _ @ -",
    )


def create_app(
    settings: Settings,
    upstreams: Upstreams | None = None,
    dashboard_dir: Path = DASHBOARD_DIR,
) -> FastAPI:
    """Build the app. Without ``upstreams`` its lifespan opens gRPC channels to SCHEDULER_ADDR
    and KEYVAULT_ADDR (and closes them); with them, the caller owns the channels."""
    secret = local_secret(settings)
    state = GatewayState(
        settings=settings,
        verifier=TokenVerifier(settings, secret),
        local_issuer=(
            LocalTokenIssuer(secret, settings.gateway_local_token_ttl_s) if secret is not None else None
        ),
        upstreams=upstreams,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if upstreams is not None:
            yield
            return
        if settings.auth_mode == "local" and settings.gateway_host not in LOOPBACK_HOSTS:
            log.warning(
                "AUTH_MODE=local lets anyone sign in as any username "
                "(GATEWAY_ALLOW_INSECURE_LOCAL_SIGN_IN is set); use AUTH_MODE=jwt for other networks"
            )
        # Channels belong to the serving event loop, so they are opened here, not earlier.
        state.upstreams = open_upstreams(settings)
        log.info(
            "gateway ready",
            extra={
                "scheduler": settings.scheduler_addr,
                "keyvault": settings.keyvault_addr,
                "auth_mode": settings.auth_mode,
            },
        )
        try:
            yield
        finally:
            await state.upstreams.close()
            state.upstreams = None

    app = FastAPI(
        title="Influence Dashboard API",
        version="1.0",
        description="Fine-tune a model on your examples, evaluate it and see which training "
        "examples drove each answer.",
        lifespan=lifespan,
    )
    app.state.gateway = state
    # Served on GATEWAY_METRICS_PORT by GatewayServer, not by this (public) app.
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    _install_error_handlers(app)
    _install_system_routes(app, state)
    if state.local_issuer is not None:  # AUTH_MODE=local
        _install_local_sign_in(app, state.local_issuer, settings.gateway_local_token_ttl_s)
    app.include_router(jobs_api.router)
    app.include_router(experiments_api.router)
    app.include_router(settings_api.router)
    app.include_router(tracking_api.router)
    app.include_router(models_api.router)
    app.include_router(data_api.router)
    app.include_router(datasets_api.router)
    app.include_router(counterfactual_api.router)
    app.include_router(queries_api.router)
    app.include_router(curation_api.router)
    app.include_router(merges_api.router)
    app.include_router(config_api.router)
    app.include_router(usage_api.router)
    app.include_router(webhooks_api.router)
    app.include_router(uploads_api.router)
    _install_dashboard(app, dashboard_dir)
    _install_openapi(app)
    # Outermost first: metrics see every answer, the size limit runs before any parsing.
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.gateway_max_body_bytes,
        larger={datasets_api.UPLOAD_PATH: settings.gateway_max_dataset_bytes},
    )
    app.add_middleware(RequestMetrics, registry=registry)
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        return JSONResponse(
            {"detail": exc.message}, status_code=exc.status, headers={**headers, **exc.headers}
        )

    @app.exception_handler(SpecInvalid)
    async def spec_invalid(_request: Request, exc: SpecInvalid) -> JSONResponse:
        return JSONResponse({"detail": exc.problems}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        malformed = json_error(errors)
        if malformed is not None:
            return JSONResponse({"detail": malformed.message}, status_code=malformed.status)
        return JSONResponse({"detail": validation_problems(errors, True)}, status_code=422)


def _install_system_routes(app: FastAPI, state: GatewayState) -> None:
    @app.get("/healthz", tags=["system"], summary="The process is alive", response_model=Health)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["system"],
        summary="Scheduler and keyvault are serving",
        responses={
            200: {"model": Readiness, "description": "Every dependency is serving"},
            503: {"model": Readiness, "description": "A dependency is not ready"},
        },
    )
    async def readyz() -> JSONResponse:
        not_ready = await state.upstreams.not_ready() if state.upstreams else ["scheduler", "keyvault"]
        if not_ready:
            return JSONResponse(
                {
                    "status": "not ready",
                    "not_ready": not_ready,
                    "detail": f"Not ready: {', '.join(not_ready)} not serving",
                },
                status_code=503,
            )
        return JSONResponse({"status": "ready", "not_ready": []})


def _install_local_sign_in(app: FastAPI, issuer: LocalTokenIssuer, ttl_s: int) -> None:
    @app.post(
        "/api/auth/local",
        tags=["auth"],
        summary="Sign in locally (AUTH_MODE=local only)",
        response_model=AccessToken,
        responses={422: ERRORS[422], "default": error("Any other error")},
    )
    async def local_sign_in(body: LocalSignIn) -> dict[str, Any]:
        """No password: for a stack on one machine. The token's subject is ``local:<username>``."""
        return {"access_token": issuer.issue(body.username), "token_type": "bearer", "expires_in": ttl_s}


def _install_dashboard(app: FastAPI, dashboard_dir: Path) -> None:
    index = dashboard_dir / "index.html"
    static_dir = dashboard_dir / "static"

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        if index.is_file():
            return FileResponse(index, media_type="text/html")
        return JSONResponse(
            {"detail": "The dashboard is not installed; the API is documented at /docs"},
            status_code=404,
        )

    # Served from the installed plotly package rather than a 4.8 MB copy in the repository;
    # registered before the /static mount so the mount does not shadow it.
    @app.get("/static/vendor/plotly.min.js", include_in_schema=False)
    async def plotly_js() -> Response:
        return FileResponse(PLOTLY_JS, media_type="text/javascript")

    if static_dir.is_dir():
        app.mount("/static", StaticFiles(directory=static_dir), name="static")


def _install_openapi(app: FastAPI) -> None:
    """Adds the experiment spec's nested models (referenced by /api/train and /api/estimate,
    whose bodies are validated by hand) to the document's components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name, model in jobs_api.spec_component_schemas().items():
            components.setdefault(name, model)
        # The event stream's data objects, referenced by /api/jobs/{job_id}/events.
        for model in (JobEvent, StreamEnd):
            components.setdefault(model.__name__, model.model_json_schema())
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

"""The gRPC face of compute-local: ``influence.v1.ComputeProvider`` over the LocalRunner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from prometheus_client import REGISTRY, CollectorRegistry

from compute_local.config import Settings
from compute_local.estimate import estimate
from compute_local.jobs import JobStore
from compute_local.metrics import RunnerCollector
from compute_local.runner import (
    ArtifactNotFound,
    InvalidCursor,
    JobNotFound,
    LocalRunner,
    NotAccepting,
    ResultNotReady,
)
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc
from service_runtime.callers import caller_tokens_of
from service_runtime.grpc_server import GrpcService, create_grpc_server
from service_runtime.jobs import dataset_files_payload, event_message, job_state
from service_runtime.lifecycle import run_service
from service_runtime.metrics import MetricsServer, start_metrics_server

log = logging.getLogger(__name__)

SERVICE_NAME = "influence.v1.ComputeProvider"
_MAX_JOB_ID_CHARS = 256
ARTIFACT_CHUNK_BYTES = 1024 * 1024


# Same shape as compute-modal's servicer: both implement the ComputeProvider RPCs by name over
# their own backend (a runner here, a provider there); only the signatures line up.
class ComputeLocalServicer(compute_pb2_grpc.ComputeProviderServicer):
    def __init__(self, runner: LocalRunner) -> None:
        self._runner = runner

    async def VerifyCredentials(
        self, request: compute_pb2.VerifyCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.VerifyCredentialsResponse:
        return compute_pb2.VerifyCredentialsResponse(
            valid=True,
            account_id="local",
            balance_usd=-1.0,
            message="compute-local runs on this host and needs no credentials",
        )

    async def PrepareAccount(
        self, request: compute_pb2.PrepareAccountRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.PrepareAccountResponse:
        return compute_pb2.PrepareAccountResponse(endpoint_id="", created=False, status="ready")

    async def Submit(
        self, request: compute_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.SubmitResponse:
        if len(request.job_id) > _MAX_JOB_ID_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"job_id is longer than {_MAX_JOB_ID_CHARS} characters"
            )
        try:
            provider_job_id = self._runner.submit(
                request.job_id,
                request.spec_json,
                request.kind,
                request.request_json,
                request.parent_result_json,
                user_id=request.account.user_id,
                parent_job_id=request.parent_job_id,
                parent_artifacts=[
                    {"name": a.name, "url": a.url, "sha256": a.sha256, "bytes": a.bytes}
                    for a in request.parent_artifacts
                ],
                datasets=dataset_files_payload(request),
            )
        except NotAccepting as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except OSError as exc:
            log.exception("cannot store a submitted job", extra={"job_id": request.job_id})
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"compute-local cannot store the job: {exc.strerror or exc}"
            )
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return compute_pb2.SubmitResponse(provider_job_id=provider_job_id)

    async def GetStatus(
        self, request: compute_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.GetStatusResponse:
        try:
            status = self._runner.status(request.provider_job_id, request.job_id, request.cursor)
        except JobNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except InvalidCursor as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return compute_pb2.GetStatusResponse(
            state=job_state(status.state),
            events=[event_message(event.event, event.time) for event in status.events],
            cursor=str(status.cursor),
            error=status.error,
            result_ready=status.result_ready,
            stage_message=status.stage_message,
            usage=common_pb2.JobUsage(
                gpu_seconds=status.usage[0], gpu=status.usage[1], source="compute-local host time"
            )
            if status.usage is not None
            else None,
        )

    # Same try/abort shape as GetStatus: each RPC maps its own runner errors to its own status codes.
    async def GetResult(
        self, request: compute_pb2.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.GetResultResponse:
        try:
            result_json = self._runner.result(request.provider_job_id, request.job_id)
        except JobNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ResultNotReady as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return compute_pb2.GetResultResponse(result_json=result_json)

    async def Cancel(
        self, request: compute_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.CancelResponse:
        try:
            state = await self._runner.cancel(request.provider_job_id, request.job_id)
        except JobNotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        return compute_pb2.CancelResponse(state=job_state(state))

    async def FetchArtifact(
        self, request: compute_pb2.FetchArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.ArtifactChunk]:
        try:
            path = self._runner.artifact_path(request.provider_job_id, request.job_id, request.name)
        except (JobNotFound, ArtifactNotFound) as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except ResultNotReady as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        # One chunk in memory at a time; the read runs off the event loop.
        with open(path, "rb") as handle:
            while chunk := await asyncio.to_thread(handle.read, ARTIFACT_CHUNK_BYTES):
                yield common_pb2.ArtifactChunk(data=chunk)

    async def Estimate(
        self, request: compute_pb2.EstimateRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.EstimateResponse:
        try:
            figures = estimate(
                request.spec_json,
                request.backend or "hosted",
                request.kind,
                request.request_json,
                self._runner.slot_count,
            )
        except ValueError as exc:  # an invalid spec or backend
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return compute_pb2.EstimateResponse(estimate=figures)


class ComputeLocalServer:
    """The runner, its gRPC server and its metrics endpoint, started and stopped together."""

    def __init__(self, settings: Settings, registry: CollectorRegistry = REGISTRY) -> None:
        self.settings = settings
        self.runner = LocalRunner(
            store=JobStore(Path(settings.compute_local_work_dir)),
            devices=settings.device_slots,
            cancel_grace_s=settings.compute_local_cancel_grace_s,
            retention_s=settings.compute_local_result_retention_s,
            log_level=settings.log_level,
            warm_query_workers=settings.compute_local_warm_query_workers,
            warm_query_idle_s=settings.compute_local_warm_query_idle_s,
        )
        self._registry = registry
        self._collector = RunnerCollector(self.runner)
        self._metrics_server: MetricsServer | None = None
        self.metrics_port: int | None = None
        self._stopped = False

        def register(server: grpc.aio.Server) -> list[str]:
            compute_pb2_grpc.add_ComputeProviderServicer_to_server(ComputeLocalServicer(self.runner), server)
            return [SERVICE_NAME]

        self.grpc: GrpcService = create_grpc_server(
            settings.address, register, "compute-local", caller_tokens_of(settings.compute_caller_tokens)
        )

    @property
    def port(self) -> int:
        return self.grpc.port

    # Same opening as keyvault's start (serve, not ready yet); what makes each ready differs.
    async def start(self) -> None:
        """Serve; readiness turns SERVING once the stored jobs are loaded and the queue runs."""
        await self.grpc.server.start()
        await self.grpc.set_ready(False)
        await self.runner.start()
        self._registry.register(self._collector)
        self._metrics_server = start_metrics_server(
            self.settings.compute_local_host, self.settings.compute_local_metrics_port, self._registry
        )
        if self._metrics_server is not None:
            self.metrics_port = self._metrics_server.port
        await self.grpc.set_ready(True)
        log.info("compute-local serving", extra={"port": self.port, "metrics_port": self.metrics_port})

    async def stop(self, grace_s: float | None = None) -> None:
        """Refuse new work, drain in-flight RPCs, then end the running children (their jobs
        become FAILED "compute-local stopped"; queued jobs stay queued on disk)."""
        if self._stopped:
            return
        self._stopped = True
        log.info("compute-local stopping")
        self.runner.stop_accepting()
        await self.grpc.stop(self.settings.compute_local_shutdown_grace_s if grace_s is None else grace_s)
        await self.runner.shutdown()
        self._registry.unregister(self._collector)
        if self._metrics_server is not None:
            self._metrics_server.stop()


async def start_service(settings: Settings, registry: CollectorRegistry = REGISTRY) -> ComputeLocalServer:
    """Build and start compute-local (tests pass port 0 and read ``service.port``)."""
    service = ComputeLocalServer(settings, registry)
    await service.start()
    return service


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (service_runtime.lifecycle)."""
    await run_service(ComputeLocalServer(settings), "compute-local")

"""The ComputeProvider gRPC service for RunPod, and an async factory usable from tests."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc

from compute_runpod.client import RunPodClient
from compute_runpod.config import Settings
from compute_runpod.errors import ProviderError
from compute_runpod.keys import KeyVaultKeys
from compute_runpod.metrics import PROVIDER_ERRORS
from compute_runpod.provider import AccountRef, EndpointView, RunPodProvider
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc
from service_runtime.callers import caller_tokens_of
from service_runtime.grpc_server import GrpcService, create_grpc_server
from service_runtime.jobs import dataset_files_payload, event_message, job_state
from service_runtime.lifecycle import run_service
from service_runtime.logs import redact
from service_runtime.metrics import MetricsServer, start_metrics_server

log = logging.getLogger(__name__)

SERVICE_NAME = "influence.v1.ComputeProvider"
T = TypeVar("T")


def _account(message: common_pb2.Account) -> AccountRef:
    return AccountRef(user_id=message.user_id, endpoint_id=message.endpoint_id, hosted=message.hosted)


class ComputeRunPodServicer(compute_pb2_grpc.ComputeProviderServicer):
    def __init__(self, provider: RunPodProvider) -> None:
        self._provider = provider

    async def _call(self, context: grpc.aio.ServicerContext, work: Callable[[], Awaitable[T]]) -> T:
        try:
            return await work()
        except ProviderError as exc:
            PROVIDER_ERRORS.labels(exc.code.value).inc()
            await context.abort(getattr(grpc.StatusCode, exc.code.value), redact(exc.message))
        raise AssertionError("unreachable: abort raises")

    async def VerifyCredentials(self, request, context):
        verification = await self._call(
            context, lambda: self._provider.verify(_account(request.account), request.api_key)
        )
        failure = verification.failure
        return compute_pb2.VerifyCredentialsResponse(
            valid=verification.valid,
            account_id=verification.account_id,
            balance_usd=verification.balance_usd,
            message=redact(verification.message),
            failure=(
                # protoc's stubs type Value() as a plain int
                cast(common_pb2.KeyFailure, common_pb2.KeyFailure.Value(f"KEY_FAILURE_{failure.value}"))
                if failure
                else common_pb2.KEY_FAILURE_UNSPECIFIED
            ),
        )

    async def PrepareAccount(self, request, context):
        prepared = await self._call(
            context,
            lambda: self._provider.prepare(
                _account(request.account),
                request.model_params_b,
                request.quantization,
                request.model_id,
                request.runpod_gpu,
            ),
        )
        return compute_pb2.PrepareAccountResponse(
            endpoint_id=prepared.endpoint_id, created=prepared.created, status=prepared.status
        )

    async def Submit(self, request, context):
        # Same shape as compute-modal's Submit: each provider forwards the SubmitRequest's fields
        # into its own provider.submit; sharing it would couple two services' servers.
        provider_job_id = await self._call(
            context,
            lambda: self._provider.submit(
                request.job_id,
                _account(request.account),
                request.spec_json,
                request.estimated_cost_usd,
                request.kind,
                request.request_json,
                request.parent_result_json,
                {upload.name: upload.url for upload in request.artifact_uploads},
                [
                    {"name": a.name, "url": a.url, "sha256": a.sha256, "bytes": a.bytes}
                    for a in request.parent_artifacts
                ],
                request.estimated_time_s,
                dataset_files_payload(request),
                request.webhook_url,
            ),
        )
        return compute_pb2.SubmitResponse(provider_job_id=provider_job_id)

    async def GetStatus(self, request, context):
        report = await self._call(
            context,
            lambda: self._provider.status(_account(request.account), request.provider_job_id, request.cursor),
        )
        # RunPod's stream gives no event times: an event is dated when compute-runpod read it.
        received = time.time()
        return compute_pb2.GetStatusResponse(
            state=job_state(report.state),
            events=[event_message(e, received) for e in report.events],
            cursor=report.cursor,
            error=report.error,
            result_ready=report.result_ready,
            stage_message=report.stage_message,
            usage=common_pb2.JobUsage(
                gpu_seconds=report.usage.gpu_seconds,
                delay_seconds=report.usage.delay_seconds,
                source=report.usage.source,
            )
            if report.usage is not None
            else None,
        )

    async def GetResult(self, request, context):
        result = await self._call(
            context, lambda: self._provider.result(_account(request.account), request.provider_job_id)
        )
        return compute_pb2.GetResultResponse(result_json=result)

    async def FetchArtifact(self, request, context):
        parts = await self._call(
            context,
            lambda: self._provider.artifact(_account(request.account), request.provider_job_id, request.name),
        )
        try:
            for data in parts:
                # Parts are at most ARTIFACT_PART_BYTES (384 KiB): one message each.
                yield common_pb2.ArtifactChunk(data=data)
        except ProviderError as exc:
            PROVIDER_ERRORS.labels(exc.code.value).inc()
            await context.abort(getattr(grpc.StatusCode, exc.code.value), redact(exc.message))

    async def Cancel(self, request, context):
        state = await self._call(
            context, lambda: self._provider.cancel(_account(request.account), request.provider_job_id)
        )
        return compute_pb2.CancelResponse(state=job_state(state))

    async def DescribeEndpoint(self, request, context):
        view = await self._call(context, lambda: self._provider.describe_endpoint(_account(request.account)))
        return _endpoint_info(view)

    async def DeleteEndpoint(self, request, context):
        view = await self._call(context, lambda: self._provider.delete_endpoint(_account(request.account)))
        return _endpoint_info(view)

    async def Estimate(self, request, context):
        async def work() -> dict[str, Any]:
            return self._provider.estimate(
                request.spec_json, request.backend, request.kind, request.request_json
            )

        fields = await self._call(context, work)
        return compute_pb2.EstimateResponse(estimate=common_pb2.Estimate(**fields))


def _endpoint_info(view: EndpointView) -> common_pb2.EndpointInfo:
    return common_pb2.EndpointInfo(
        byok_available=view.byok_available,
        unavailable_reason=view.unavailable_reason,
        state=view.state,
        endpoint_id=view.endpoint_id,
        name=view.name,
        gpu_pools=list(view.gpu_pools),
        workers_max=view.workers_max,
        workers=common_pb2.EndpointWorkers(**view.workers),
        execution_timeout_s=view.execution_timeout_s,
        console_url=view.console_url,
    )


class ComputeRunPodServer:
    """compute-runpod's gRPC server with its RunPod client, keyvault channel and metrics endpoint.
    Ready as soon as it serves: it holds no long-lived connection (RunPod and keyvault are
    reached per call)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client = RunPodClient(settings)
        self.keys = KeyVaultKeys(settings.keyvault_addr, settings.keyvault_token.get_secret_value())
        provider = RunPodProvider(settings, self.client, self.keys.reveal, self.keys.hf_token)

        def register(server: grpc.aio.Server) -> list[str]:
            compute_pb2_grpc.add_ComputeProviderServicer_to_server(ComputeRunPodServicer(provider), server)
            return [SERVICE_NAME]

        address = f"{settings.compute_runpod_host}:{settings.compute_runpod_port}"
        self.grpc: GrpcService = create_grpc_server(
            address, register, "compute-runpod", caller_tokens_of(settings.compute_caller_tokens)
        )
        self.metrics_server: MetricsServer | None = None

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    async def start(self) -> None:
        await self.grpc.server.start()
        await self.grpc.set_ready(True)
        self.metrics_server = start_metrics_server(
            self.settings.compute_runpod_host, self.settings.compute_runpod_metrics_port
        )
        log.info("compute-runpod serving", extra={"port": self.port, "metrics_port": self.metrics_port})

    async def stop(self, grace_s: float | None = None) -> None:
        await self.grpc.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        await self.client.aclose()
        await self.keys.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()


# Same shape as the gateway's start_gateway/serve: each service's entry points name its own server
# class and service name around service_runtime.lifecycle, which already holds the shared logic.
async def start_server(settings: Settings) -> ComputeRunPodServer:
    """Start compute-runpod (port 0 picks a free port: see ``.port``), ready at once."""
    server = ComputeRunPodServer(settings)
    await server.start()
    return server


async def serve(settings: Settings) -> None:
    """Run until SIGTERM/SIGINT, then drain and close (service_runtime.lifecycle)."""
    await run_service(ComputeRunPodServer(settings), "compute-runpod")

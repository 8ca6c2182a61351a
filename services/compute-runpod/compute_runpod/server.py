"""The ComputeProvider gRPC service for RunPod, and an async factory usable from tests."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc
from service_runtime.grpc_server import GrpcService, create_grpc_server
from service_runtime.logs import redact
from service_runtime.metrics import start_metrics_server

from compute_runpod.client import RunPodClient
from compute_runpod.config import Settings
from compute_runpod.errors import ProviderError
from compute_runpod.keys import KeyVaultKeys
from compute_runpod.metrics import PROVIDER_ERRORS
from compute_runpod.provider import AccountRef, RunPodProvider

log = logging.getLogger(__name__)

SERVICE_NAME = "influence.v1.ComputeProvider"
T = TypeVar("T")


def _account(message: common_pb2.Account) -> AccountRef:
    return AccountRef(user_id=message.user_id, endpoint_id=message.endpoint_id, hosted=message.hosted)


def _state(name: str) -> common_pb2.JobState:
    return common_pb2.JobState.Value(f"JOB_STATE_{name}")


def _event(event: dict[str, Any]) -> common_pb2.ProgressEvent:
    time = Timestamp()
    time.GetCurrentTime()
    progress = event.get("progress")
    return common_pb2.ProgressEvent(
        type=str(event.get("type") or "progress"),
        stage=str(event.get("stage") or ""),
        progress=float(progress) if isinstance(progress, int | float) else 0.0,
        message=str(event.get("message") or ""),
        event_json=json.dumps(event).encode(),
        time=time,
    )


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

    async def VerifyCredentials(self, request, context):  # noqa: N802, ANN001, ANN201
        verification = await self._call(
            context, lambda: self._provider.verify(_account(request.account), request.api_key)
        )
        return compute_pb2.VerifyCredentialsResponse(
            valid=True, account_id=verification.account_id,
            balance_usd=verification.balance_usd, message=verification.message,
        )

    async def PrepareAccount(self, request, context):  # noqa: N802, ANN001, ANN201
        prepared = await self._call(
            context,
            lambda: self._provider.prepare(
                _account(request.account), request.model_params_b, request.quantization,
                request.model_id,
            ),
        )
        return compute_pb2.PrepareAccountResponse(
            endpoint_id=prepared.endpoint_id, created=prepared.created, status=prepared.status
        )

    async def Submit(self, request, context):  # noqa: N802, ANN001, ANN201
        provider_job_id = await self._call(
            context,
            lambda: self._provider.submit(
                request.job_id, _account(request.account), request.spec_json,
                request.estimated_cost_usd, request.kind, request.request_json,
                request.parent_result_json,
                {upload.name: upload.url for upload in request.artifact_uploads},
            ),
        )
        return compute_pb2.SubmitResponse(provider_job_id=provider_job_id)

    async def GetStatus(self, request, context):  # noqa: N802, ANN001, ANN201
        report = await self._call(
            context,
            lambda: self._provider.status(
                _account(request.account), request.provider_job_id, request.cursor
            ),
        )
        return compute_pb2.GetStatusResponse(
            state=_state(report.state), events=[_event(e) for e in report.events],
            cursor=report.cursor, error=report.error, result_ready=report.result_ready,
            stage_message=report.stage_message,
        )

    async def GetResult(self, request, context):  # noqa: N802, ANN001, ANN201
        result = await self._call(
            context, lambda: self._provider.result(_account(request.account), request.provider_job_id)
        )
        return compute_pb2.GetResultResponse(result_json=result)

    async def FetchArtifact(self, request, context):  # noqa: N802, ANN001, ANN201
        parts = await self._call(
            context,
            lambda: self._provider.artifact(
                _account(request.account), request.provider_job_id, request.name
            ),
        )
        try:
            for data in parts:
                # Parts are at most ARTIFACT_PART_BYTES (384 KiB): one message each.
                yield common_pb2.ArtifactChunk(data=data)
        except ProviderError as exc:
            PROVIDER_ERRORS.labels(exc.code.value).inc()
            await context.abort(getattr(grpc.StatusCode, exc.code.value), redact(exc.message))

    async def Cancel(self, request, context):  # noqa: N802, ANN001, ANN201
        state = await self._call(
            context, lambda: self._provider.cancel(_account(request.account), request.provider_job_id)
        )
        return compute_pb2.CancelResponse(state=_state(state))

    async def Estimate(self, request, context):  # noqa: N802, ANN001, ANN201
        async def work() -> dict[str, Any]:
            return self._provider.estimate(
                request.spec_json, request.backend, request.kind, request.request_json
            )

        fields = await self._call(context, work)
        return compute_pb2.EstimateResponse(estimate=common_pb2.Estimate(**fields))


@dataclass
class RunningServer:
    grpc: GrpcService
    metrics_port: int | None
    client: RunPodClient
    keys: KeyVaultKeys

    @property
    def port(self) -> int:
        return self.grpc.port

    async def stop(self, grace_s: float = 0.0) -> None:
        await self.grpc.stop(grace_s)
        await self.client.aclose()
        await self.keys.close()


def build_server(settings: Settings) -> tuple[GrpcService, RunPodClient, KeyVaultKeys]:
    client = RunPodClient(settings)
    keys = KeyVaultKeys(settings.KEYVAULT_ADDR, settings.KEYVAULT_TOKEN.get_secret_value())
    provider = RunPodProvider(settings, client, keys.reveal)

    def register(server: grpc.aio.Server) -> list[str]:
        compute_pb2_grpc.add_ComputeProviderServicer_to_server(ComputeRunPodServicer(provider), server)
        return [SERVICE_NAME]

    address = f"{settings.COMPUTE_RUNPOD_HOST}:{settings.COMPUTE_RUNPOD_PORT}"
    return create_grpc_server(address, register, "compute-runpod"), client, keys


def start_metrics(settings: Settings) -> int | None:
    metrics = start_metrics_server(settings.COMPUTE_RUNPOD_HOST, settings.COMPUTE_RUNPOD_METRICS_PORT)
    return metrics.port if metrics is not None else None


async def start_server(settings: Settings) -> RunningServer:
    """Start compute-runpod (port 0 picks a free port) and mark it ready: it depends on no
    long-lived connection (RunPod and keyvault are reached per call)."""
    service, client, keys = build_server(settings)
    await service.server.start()
    await service.set_ready(True)
    metrics_port = start_metrics(settings)
    log.info("compute-runpod serving", extra={"port": service.port, "metrics_port": metrics_port})
    return RunningServer(grpc=service, metrics_port=metrics_port, client=client, keys=keys)

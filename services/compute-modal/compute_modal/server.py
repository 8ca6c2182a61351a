"""The gRPC face of compute-modal: ``influence.v1.ComputeProvider`` over ``ModalProvider``.

Readiness: SERVING while the last check found the token valid and the app deployed (re-checked
every COMPUTE_MODAL_HEALTH_INTERVAL_S); the service starts and answers either way, so a missing
token shows up as a clear error from VerifyCredentials / Submit, not as a crash.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import REGISTRY, CollectorRegistry

from compute_modal.adapter import ModalAdapter, ModalSdkAdapter
from compute_modal.config import Settings
from compute_modal.provider import JobStatus, ModalProvider, NotConfigured, ProviderError, Unreachable
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc
from service_runtime.callers import caller_tokens_of
from service_runtime.grpc_server import GrpcService, create_grpc_server
from service_runtime.jobs import dataset_files_payload, event_message, job_state
from service_runtime.keyvault import HUGGINGFACE, KeyVaultError, KeyVaultReader
from service_runtime.lifecycle import Readiness, run_service
from service_runtime.metrics import MetricsServer, start_metrics_server

log = logging.getLogger(__name__)

SERVICE_NAME = "influence.v1.ComputeProvider"


@contextlib.asynccontextmanager
async def _errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    try:
        yield
    except ProviderError as exc:
        await context.abort(getattr(grpc.StatusCode, exc.code), str(exc))


def _status_to_proto(status: JobStatus) -> compute_pb2.GetStatusResponse:
    return compute_pb2.GetStatusResponse(
        state=job_state(status.state.value),
        events=[event_message(item.event, item.time) for item in status.events],
        cursor=str(status.cursor),
        error=status.error,
        result_ready=status.result_ready,
        stage_message=status.stage_message,
        usage=common_pb2.JobUsage(gpu_seconds=status.usage.gpu_seconds, source=status.usage.source)
        if status.usage is not None
        else None,
    )


class ComputeModalServicer(compute_pb2_grpc.ComputeProviderServicer):
    def __init__(self, provider: ModalProvider) -> None:
        self._provider = provider

    async def VerifyCredentials(
        self, request: compute_pb2.VerifyCredentialsRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.VerifyCredentialsResponse:
        async with _errors(context):
            result = await self._provider.verify(request.api_key)
        return compute_pb2.VerifyCredentialsResponse(
            valid=result.valid,
            account_id="modal" if result.valid else "",
            balance_usd=-1.0,
            message=result.message,
            # Modal runs on the operator's token only: every refusal is of that token (or of a key
            # the hosted tier does not take).
            failure=common_pb2.KEY_FAILURE_UNSPECIFIED if result.valid else common_pb2.KEY_FAILURE_INVALID,
        )

    async def PrepareAccount(
        self, request: compute_pb2.PrepareAccountRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.PrepareAccountResponse:
        async with _errors(context):
            await self._provider.check()
        return compute_pb2.PrepareAccountResponse(endpoint_id="", created=False, status="ready")

    async def Submit(
        self, request: compute_pb2.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.SubmitResponse:
        # Same unpacking of artifact_uploads/parent_artifacts as compute-runpod's Submit; each
        # service's servicer stays on its own (no lib holds servicer code), around its own call.
        async with _errors(context):
            call_id = await self._provider.submit(
                request.job_id,
                request.spec_json,
                request.kind,
                request.request_json,
                request.parent_result_json,
                {upload.name: upload.url for upload in request.artifact_uploads},
                [
                    {"name": a.name, "url": a.url, "sha256": a.sha256, "bytes": a.bytes}
                    for a in request.parent_artifacts
                ],
                user_id=request.account.user_id,
                datasets=dataset_files_payload(request),
            )
        return compute_pb2.SubmitResponse(provider_job_id=call_id)

    async def GetStatus(
        self, request: compute_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.GetStatusResponse:
        async with _errors(context):
            status = await self._provider.status(request.provider_job_id, request.job_id, request.cursor)
        return _status_to_proto(status)

    async def GetResult(
        self, request: compute_pb2.GetResultRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.GetResultResponse:
        async with _errors(context):
            result_json = await self._provider.result(request.provider_job_id)
        return compute_pb2.GetResultResponse(result_json=result_json)

    async def Cancel(
        self, request: compute_pb2.CancelRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.CancelResponse:
        async with _errors(context):
            state = await self._provider.cancel(request.provider_job_id, request.job_id)
        return compute_pb2.CancelResponse(state=job_state(state.value))

    async def Estimate(
        self, request: compute_pb2.EstimateRequest, context: grpc.aio.ServicerContext
    ) -> compute_pb2.EstimateResponse:
        async with _errors(context):
            figures = self._provider.estimate(
                request.spec_json, request.backend, request.kind, request.request_json
            )
        return compute_pb2.EstimateResponse(estimate=common_pb2.Estimate(**figures.as_dict()))


def build_adapter(settings: Settings) -> ModalAdapter:
    if settings.compute_modal_backend == "inprocess":
        from compute_modal.inprocess import InProcessModal

        return InProcessModal()
    return ModalSdkAdapter(
        token_id=settings.modal_token_id,
        token_secret=settings.modal_token_secret,
        environment=settings.modal_environment,
        app_name=settings.modal_app_name,
        function_name=settings.modal_function_name,
        progress_dict=settings.modal_progress_dict,
    )


class ComputeModalServer:
    """The provider, its gRPC server, readiness checks and metrics endpoint."""

    def __init__(
        self, settings: Settings, adapter: ModalAdapter | None = None, registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.settings = settings
        self.adapter = adapter or build_adapter(settings)
        self.keys = (
            KeyVaultReader(settings.keyvault_addr, settings.keyvault_token.get_secret_value())
            if settings.keyvault_addr and settings.keyvault_token.get_secret_value()
            else None
        )
        self.provider = ModalProvider(
            self.adapter,
            settings.modal_app_name,
            settings.modal_function_name,
            settings.modal_environment,
            self._hf_token if self.keys is not None else None,
            max_containers=settings.modal_max_containers,
        )
        self._registry = registry
        self._metrics_server: MetricsServer | None = None
        self.metrics_port: int | None = None

        def register(server: grpc.aio.Server) -> list[str]:
            compute_pb2_grpc.add_ComputeProviderServicer_to_server(
                ComputeModalServicer(self.provider), server
            )
            return [SERVICE_NAME]

        self.grpc: GrpcService = create_grpc_server(
            settings.address, register, "compute-modal", caller_tokens_of(settings.compute_caller_tokens)
        )
        self.readiness = Readiness(
            "compute-modal", self._modal_ready, settings.compute_modal_health_interval_s
        )
        self.readiness.attach(self.grpc)

    @property
    def port(self) -> int:
        return self.grpc.port

    async def _hf_token(self, user_id: str) -> str:
        assert self.keys is not None
        try:
            return await self.keys.reveal(user_id, HUGGINGFACE) or ""
        except KeyVaultError as exc:
            if exc.refused:
                raise NotConfigured(
                    "compute-modal may not read Hugging Face tokens (check its KEYVAULT_TOKEN and "
                    "keyvault's KEYVAULT_CALLER_TOKENS)"
                ) from None
            raise Unreachable(f"the key store is unavailable ({exc.code.name})") from None

    async def _modal_ready(self) -> bool:
        """Modal answers and the app is deployed (a ProviderError says why not)."""
        await self.provider.check()
        return True

    async def start(self) -> None:
        await self.grpc.server.start()
        await self.grpc.set_ready(False)
        self._metrics_server = start_metrics_server(
            self.settings.compute_modal_host, self.settings.compute_modal_metrics_port, self._registry
        )
        if self._metrics_server is not None:
            self.metrics_port = self._metrics_server.port
        # Checking Modal may take a while: the server answers meanwhile, NOT_SERVING.
        await self.readiness.start(wait_first=False)
        log.info("compute-modal serving", extra={"port": self.port, "metrics_port": self.metrics_port})

    async def stop(self, grace_s: float | None = None) -> None:
        log.info("compute-modal stopping")
        await self.readiness.stop()
        await self.grpc.stop(self.settings.shutdown_grace_s if grace_s is None else grace_s)
        shutdown = getattr(self.adapter, "shutdown", None)
        if shutdown is not None:
            await shutdown()
        if self._metrics_server is not None:
            self._metrics_server.stop()
        if self.keys is not None:
            await self.keys.close()


async def start_service(
    settings: Settings, adapter: ModalAdapter | None = None, registry: CollectorRegistry = REGISTRY
) -> ComputeModalServer:
    """Build and start compute-modal (tests pass port 0 and read ``service.port``)."""
    service = ComputeModalServer(settings, adapter, registry)
    await service.start()
    return service


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully (service_runtime.lifecycle)."""
    await run_service(ComputeModalServer(settings), "compute-modal")

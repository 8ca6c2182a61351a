"""gRPC channels to the scheduler and keyvault, the typed clients every route calls them through
(one place for trace metadata, deadlines and error mapping), and the translation of their status
codes into HTTP answers with plain messages."""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import Settings
from influence.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc
from service_runtime.grpc_server import insecure_channel

log = logging.getLogger(__name__)

SCHEDULER_SERVICE = "influence.v1.Scheduler"
KEYVAULT_SERVICE = "influence.v1.KeyVault"
_READINESS_TIMEOUT_S = 2.0
# How the scheduler's UNAVAILABLE answers begin when its artifact store, not it, failed.
STORE_FAILURE_PREFIX = "the artifact store"
# Set by the scheduler on an UNAVAILABLE answer caused by a component behind it.
FAILED_COMPONENT_KEY = "x-failed-component"
# Set by the scheduler on a RESOURCE_EXHAUSTED refusal: seconds until a retry can succeed.
RETRY_AFTER_KEY = "retry-after-s"
_TRACE_HEADERS = ("traceparent", "tracestate")
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
SCHEDULER_DOWN = "The scheduler is unavailable; try again in a moment"
KEYVAULT_DOWN = "The key vault is unavailable; try again in a moment"
NOT_FOUND = "Not found"
Metadata = tuple[tuple[str, str], ...]
_T = TypeVar("_T")


class ApiError(Exception):
    """An answer to the client: HTTP status and a plain message."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Upstreams:
    scheduler: scheduler_pb2_grpc.SchedulerStub
    keyvault: keyvault_pb2_grpc.KeyVaultStub
    scheduler_channel: grpc.aio.Channel
    keyvault_channel: grpc.aio.Channel
    keyvault_metadata: Metadata
    timeout_s: float

    async def close(self) -> None:
        await asyncio.gather(self.scheduler_channel.close(), self.keyvault_channel.close())

    def scheduler_client(self, trace: Metadata) -> SchedulerClient:
        return SchedulerClient(self.scheduler, trace, self.timeout_s)

    def keyvault_client(self, trace: Metadata) -> KeyVaultClient:
        return KeyVaultClient(self.keyvault, (*self.keyvault_metadata, *trace), self.timeout_s)

    async def not_ready(self) -> list[str]:
        """Names of the dependencies whose readiness check is not SERVING."""
        checks = {
            "scheduler": (self.scheduler_channel, SCHEDULER_SERVICE),
            "keyvault": (self.keyvault_channel, KEYVAULT_SERVICE),
        }
        results = await asyncio.gather(
            *(_is_serving(channel, service) for channel, service in checks.values())
        )
        return [name for name, serving in zip(checks, results, strict=True) if not serving]


def scheduler_target(address: str) -> str:
    """SCHEDULER_ADDR as a gRPC target: one host:port (a DNS name resolving to every replica is
    balanced round robin), or a comma-separated list of ip:port, one per replica."""
    return f"ipv4:{address}" if "," in address else address


def open_upstreams(settings: Settings) -> Upstreams:
    """Open the channels (lazily connecting); call from inside the running event loop."""
    scheduler_token = settings.scheduler_token
    scheduler_channel = insecure_channel(
        scheduler_target(settings.scheduler_addr),
        [("grpc.lb_policy_name", "round_robin")],
        caller_token=scheduler_token.get_secret_value() if scheduler_token else None,
    )
    keyvault_channel = insecure_channel(settings.keyvault_addr)
    token = settings.keyvault_token
    return Upstreams(
        scheduler=scheduler_pb2_grpc.SchedulerStub(scheduler_channel),
        keyvault=keyvault_pb2_grpc.KeyVaultStub(keyvault_channel),
        scheduler_channel=scheduler_channel,
        keyvault_channel=keyvault_channel,
        keyvault_metadata=(("x-caller-token", token.get_secret_value()),) if token else (),
        timeout_s=settings.gateway_rpc_timeout_s,
    )


async def _is_serving(channel: grpc.aio.Channel, service: str) -> bool:
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        # types-grpcio-health-checking's HealthStub declares none of the methods it has
        response = await stub.Check(  # type: ignore[attr-defined]
            health_pb2.HealthCheckRequest(service=service), timeout=_READINESS_TIMEOUT_S
        )
    except grpc.aio.AioRpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


def trace_metadata(headers: Mapping[str, str]) -> Metadata:
    """W3C trace context from the incoming request, forwarded as gRPC metadata; a request
    without one starts a new trace here, so one id follows it through scheduler and compute."""
    if _TRACEPARENT.fullmatch(headers.get("traceparent", "")):
        return tuple((name, headers[name]) for name in _TRACE_HEADERS if headers.get(name))
    return (("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"),)


_HTTP_STATUS = {
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.INVALID_ARGUMENT: 422,
    grpc.StatusCode.OUT_OF_RANGE: 422,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    # Only the scheduler answers UNAUTHENTICATED, about a provider key the user gave.
    grpc.StatusCode.UNAUTHENTICATED: 400,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def _trailing(exc: grpc.aio.AioRpcError, name: str) -> str:
    for key, value in exc.trailing_metadata() or ():
        if key == name:
            return str(value)
    return ""


def _failed_component(exc: grpc.aio.AioRpcError) -> str:
    """The component the scheduler named as failed (trailing metadata), or ''."""
    return _trailing(exc, FAILED_COMPONENT_KEY)


def _sentence(text: str) -> str:
    text = text.strip()
    return (text[:1].upper() + text[1:]) if text else text


@contextmanager
def scheduler_errors(unavailable: str, not_found: str = NOT_FOUND) -> Iterator[None]:
    """Translate a scheduler RPC failure into an ApiError."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        status = _HTTP_STATUS.get(code)
        if code == grpc.StatusCode.UNAVAILABLE:
            component = _failed_component(exc)
            if component:
                # The scheduler answered: a component behind it failed, and its message says which.
                log.warning("upstream component unavailable", extra={"component": component})
                raise ApiError(503, _sentence(exc.details() or f"{component} is unavailable")) from None
            details = exc.details() or ""
            if details.startswith(STORE_FAILURE_PREFIX):
                # The scheduler is up; its artifact store is not: say which one failed.
                log.warning("artifact store unavailable", extra={"grpc_details": details})
                raise ApiError(503, f"{details[0].upper()}{details[1:]}; try again in a moment") from None
            log.warning("scheduler unavailable", extra={"grpc_details": details})
            raise ApiError(503, unavailable) from None
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise ApiError(504, "The scheduler did not answer in time; try again") from None
        if code == grpc.StatusCode.NOT_FOUND:
            raise ApiError(404, not_found) from None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            retry_after = _trailing(exc, RETRY_AFTER_KEY)
            headers = {"Retry-After": retry_after} if retry_after.isdigit() else None
            raise ApiError(429, exc.details() or "a usage limit was reached", headers) from None
        if status is None:
            log.error("scheduler call failed", extra={"grpc_code": code.name, "grpc_details": exc.details()})
            raise ApiError(502, "The scheduler failed to answer; try again") from None
        raise ApiError(status, exc.details() or code.name.replace("_", " ").lower()) from None


@contextmanager
def keyvault_errors(unavailable: str) -> Iterator[None]:
    """Translate a keyvault RPC failure. NOT_FOUND is left to the caller (it means 'no key')."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.NOT_FOUND:
            raise
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # The gateway's own credential was refused: an operator problem, not the user's.
            log.error("keyvault refused the gateway's caller token (check KEYVAULT_TOKEN)")
            raise ApiError(503, unavailable) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            log.warning("keyvault unavailable", extra={"grpc_code": code.name})
            raise ApiError(503, unavailable) from None
        status = _HTTP_STATUS.get(code)
        if status is None:
            log.error("keyvault call failed", extra={"grpc_code": code.name})
            raise ApiError(502, "The key vault failed to answer; try again") from None
        raise ApiError(status, exc.details() or code.name.replace("_", " ").lower()) from None


class SchedulerClient:
    """The scheduler as one request's routes call it: every call carries the request's trace
    context and the gateway's deadline, and a failure becomes an ApiError (scheduler_errors)
    worded by ``unavailable`` and ``not_found`` for the route. Streams have no deadline: a
    job's events and a large artifact take as long as they take."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, trace: Metadata, timeout_s: float) -> None:
        self._stub = stub
        self._trace = trace
        self._timeout_s = timeout_s

    async def _call(
        self,
        rpc: Callable[..., Awaitable[_T]],
        request: Message,
        unavailable: str = SCHEDULER_DOWN,
        not_found: str = NOT_FOUND,
    ) -> _T:
        with scheduler_errors(unavailable, not_found):
            return await rpc(request, metadata=self._trace, timeout=self._timeout_s)

    async def submit_job(
        self, request: scheduler_pb2.SubmitJobRequest, unavailable: str, not_found: str = NOT_FOUND
    ) -> scheduler_pb2.Job:
        return await self._call(self._stub.SubmitJob, request, unavailable, not_found)

    async def estimate_job(
        self, request: scheduler_pb2.EstimateJobRequest, not_found: str = NOT_FOUND
    ) -> scheduler_pb2.EstimateJobResponse:
        return await self._call(self._stub.EstimateJob, request, not_found=not_found)

    async def get_job(
        self, request: scheduler_pb2.GetJobRequest, not_found: str = NOT_FOUND
    ) -> scheduler_pb2.Job:
        return await self._call(self._stub.GetJob, request, not_found=not_found)

    async def list_jobs(
        self, request: scheduler_pb2.ListJobsRequest, not_found: str = NOT_FOUND
    ) -> scheduler_pb2.ListJobsResponse:
        return await self._call(self._stub.ListJobs, request, not_found=not_found)

    async def wake_job(self, job_id: str, secret: str) -> None:
        """A provider's webhook; NOT_FOUND (a 404 without detail) unless the secret is the job's."""
        await self._call(self._stub.WakeJob, scheduler_pb2.WakeJobRequest(job_id=job_id, secret=secret))

    async def grant_upload(self, request: scheduler_pb2.GrantUploadRequest) -> tuple[str, dict[str, str]]:
        """One file's upload URL and the headers to send with it. A size over the operator's limits
        (the scheduler's OUT_OF_RANGE) is a 413; the rest as every scheduler answer."""
        try:
            answer: scheduler_pb2.GrantUploadResponse = await self._stub.GrantUpload(
                request, metadata=self._trace, timeout=self._timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                raise ApiError(413, _sentence(exc.details() or "the upload is too large")) from None
            with scheduler_errors(SCHEDULER_DOWN, "No such job"):
                raise
        return answer.url, dict(answer.headers)

    async def active_jobs(self, user_id: str, backend: str, unavailable: str) -> list[scheduler_pb2.Job]:
        answer: scheduler_pb2.ListJobsResponse = await self._call(
            self._stub.ListActiveJobs,
            scheduler_pb2.ListActiveJobsRequest(user_id=user_id, backend=backend),
            unavailable=unavailable,
        )
        return list(answer.jobs)

    async def update_job_labels(
        self, request: scheduler_pb2.UpdateJobLabelsRequest, not_found: str
    ) -> scheduler_pb2.Job:
        return await self._call(self._stub.UpdateJobLabels, request, not_found=not_found)

    async def job_result(self, request: scheduler_pb2.GetJobResultRequest, not_found: str) -> bytes:
        answer: scheduler_pb2.GetJobResultResponse = await self._call(
            self._stub.GetJobResult, request, not_found=not_found
        )
        return answer.result_json

    async def job_spec(self, request: scheduler_pb2.GetJobSpecRequest, not_found: str) -> bytes:
        answer: scheduler_pb2.GetJobSpecResponse = await self._call(
            self._stub.GetJobSpec, request, not_found=not_found
        )
        return answer.spec_json

    async def cancel_job(self, request: scheduler_pb2.CancelJobRequest, not_found: str) -> scheduler_pb2.Job:
        return await self._call(self._stub.CancelJob, request, not_found=not_found)

    async def delete_job(
        self, request: scheduler_pb2.DeleteJobRequest, not_found: str
    ) -> scheduler_pb2.DeleteJobResponse:
        return await self._call(self._stub.DeleteJob, request, not_found=not_found)

    async def list_artifacts(
        self, request: scheduler_pb2.ListJobArtifactsRequest, not_found: str
    ) -> scheduler_pb2.ListJobArtifactsResponse:
        return await self._call(self._stub.ListJobArtifacts, request, not_found=not_found)

    async def open_artifact(
        self, request: scheduler_pb2.JobArtifactRequest, not_found: str
    ) -> scheduler_pb2.OpenJobArtifactResponse:
        return await self._call(self._stub.OpenJobArtifact, request, not_found=not_found)

    def read_artifact(self, request: scheduler_pb2.JobArtifactRequest) -> grpc.aio.UnaryStreamCall:
        """The artifact's chunks as a gRPC stream call (iterate it; cancel it when done)."""
        return self._stub.ReadJobArtifact(request, metadata=self._trace)

    async def upload_dataset(
        self, messages: AsyncIterator[scheduler_pb2.UploadDatasetRequest], unavailable: str
    ) -> scheduler_pb2.Dataset:
        """One client stream (a header, then the file's chunks); no deadline, as for the other
        streams: a large file takes as long as it takes."""
        with scheduler_errors(unavailable):
            answer: scheduler_pb2.Dataset = await self._stub.UploadDataset(messages, metadata=self._trace)
            return answer

    async def list_datasets(self, user_id: str) -> list[scheduler_pb2.Dataset]:
        answer: scheduler_pb2.ListDatasetsResponse = await self._call(
            self._stub.ListDatasets, scheduler_pb2.ListDatasetsRequest(user_id=user_id)
        )
        return list(answer.datasets)

    async def get_dataset(
        self, request: scheduler_pb2.DatasetRequest, not_found: str
    ) -> scheduler_pb2.Dataset:
        return await self._call(self._stub.GetDataset, request, not_found=not_found)

    async def delete_dataset(
        self, request: scheduler_pb2.DatasetRequest, not_found: str
    ) -> scheduler_pb2.Dataset:
        return await self._call(self._stub.DeleteDataset, request, not_found=not_found)

    def watch_job(self, request: scheduler_pb2.WatchJobRequest) -> grpc.aio.UnaryStreamCall:
        """The job's events as a gRPC stream call (iterate it; cancel it when done)."""
        return self._stub.WatchJob(request, metadata=self._trace)

    async def compute_settings(self, user_id: str) -> scheduler_pb2.ComputeSettings:
        request = scheduler_pb2.GetComputeSettingsRequest(user_id=user_id)
        return await self._call(self._stub.GetComputeSettings, request)

    async def set_backend(
        self, user_id: str, backend: str, unavailable: str
    ) -> scheduler_pb2.ComputeSettings:
        request = scheduler_pb2.SetComputeBackendRequest(user_id=user_id, backend=backend)
        return await self._call(self._stub.SetComputeBackend, request, unavailable)

    async def tracking_settings(self, user_id: str) -> scheduler_pb2.TrackingSettings:
        request = scheduler_pb2.GetTrackingSettingsRequest(user_id=user_id)
        return await self._call(self._stub.GetTrackingSettings, request)

    async def set_tracking_settings(
        self, request: scheduler_pb2.SetTrackingSettingsRequest, unavailable: str
    ) -> scheduler_pb2.TrackingSettings:
        return await self._call(self._stub.SetTrackingSettings, request, unavailable)

    async def verify_provider_key(
        self, request: scheduler_pb2.VerifyProviderKeyRequest, unavailable: str
    ) -> scheduler_pb2.VerifyProviderKeyResponse:
        return await self._call(self._stub.VerifyProviderKey, request, unavailable)

    async def runpod_endpoint(self, user_id: str, key_stored: bool) -> common_pb2.EndpointInfo:
        request = scheduler_pb2.RunpodEndpointRequest(user_id=user_id, key_stored=key_stored)
        return await self._call(self._stub.GetRunpodEndpoint, request)

    async def delete_runpod_endpoint(self, user_id: str, unavailable: str) -> common_pb2.EndpointInfo:
        request = scheduler_pb2.RunpodEndpointRequest(user_id=user_id, key_stored=True)
        return await self._call(self._stub.DeleteRunpodEndpoint, request, unavailable)

    async def usage(self, user_id: str) -> scheduler_pb2.Usage:
        return await self._call(self._stub.GetUsage, scheduler_pb2.GetUsageRequest(user_id=user_id))


class KeyVaultClient:
    """Keyvault as one request's routes call it: the gateway's caller token and the request's
    trace context on every call, the deadline, and failures as ApiErrors (keyvault_errors).
    A key that is not stored is an answer here (None, False), not an error."""

    def __init__(self, stub: keyvault_pb2_grpc.KeyVaultStub, metadata: Metadata, timeout_s: float) -> None:
        self._stub = stub
        self._metadata = metadata
        self._timeout_s = timeout_s

    async def _call(self, rpc: Callable[..., Awaitable[_T]], request: Message, unavailable: str) -> _T:
        with keyvault_errors(unavailable):
            return await rpc(request, metadata=self._metadata, timeout=self._timeout_s)

    async def key_info(
        self, ref: keyvault_pb2.KeyRef, unavailable: str = KEYVAULT_DOWN
    ) -> keyvault_pb2.KeyInfo | None:
        try:
            return await self._call(self._stub.GetKeyInfo, ref, unavailable)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def store_key(
        self, request: keyvault_pb2.StoreKeyRequest, unavailable: str
    ) -> keyvault_pb2.KeyInfo:
        return await self._call(self._stub.StoreKey, request, unavailable)

    async def delete_key(self, ref: keyvault_pb2.KeyRef, unavailable: str) -> bool:
        """Whether a key was there to delete."""
        try:
            answer: keyvault_pb2.DeleteKeyResponse = await self._call(self._stub.DeleteKey, ref, unavailable)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return answer.deleted

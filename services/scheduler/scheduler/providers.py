"""Clients of the compute providers (every one speaks influence.v1.ComputeProvider) and the
routing of a user's backend to one of them.

gRPC errors become ``ProviderError`` here, so the job logic needs no gRPC imports.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from prometheus_client import Counter

import cost_model
from influence.v1 import common_pb2, compute_pb2, compute_pb2_grpc
from scheduler.config import ProviderName, Settings
from service_runtime.grpc_server import insecure_channel

PROVIDER_ERRORS = Counter(
    "scheduler_provider_errors_total", "Errors answered by compute providers", ["provider", "code"]
)

# Codes after which the same call may succeed later: the job waits and is retried.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
}
_T = TypeVar("_T")
_TOO_LARGE = re.compile(r"larger than max|message too large|exceeds.*(size|limit)", re.IGNORECASE)


class ProviderError(Exception):
    """A provider's answer other than OK. ``message`` is written for the researcher."""

    def __init__(self, provider: str, code: str, message: str, retryable: bool) -> None:
        super().__init__(f"{provider}: {code}: {message}")
        self.provider = provider
        self.code = code
        self.message = message
        self.retryable = retryable


class ProviderNotConfigured(Exception):
    """The backend's provider has no address on this deployment."""


@dataclass(frozen=True)
class Route:
    """Where a user's job goes: which provider, acting on which account."""

    backend: str
    provider: ProviderName

    @property
    def hosted(self) -> bool:
        return self.backend == "hosted"

    def account(self, user_id: str, endpoint_id: str = "") -> common_pb2.Account:
        return common_pb2.Account(user_id=user_id, endpoint_id=endpoint_id, hosted=self.hosted)

    @property
    def needs_endpoint(self) -> bool:
        # The user's own RunPod account needs a serverless endpoint; the hosted tier has the
        # operator's (RUNPOD_HOSTED_ENDPOINT_ID), and local / modal have none.
        return self.provider == "runpod" and not self.hosted


def route_for(backend: str, settings: Settings) -> Route:
    provider: ProviderName = settings.hosted_provider if backend == "hosted" else "runpod"
    return Route(backend=backend, provider=provider)


@dataclass(frozen=True)
class LaterJob:
    """What a provider needs for a job that builds on an experiment (gpu_core.jobs)."""

    kind: str
    request_json: bytes
    parent_result_json: bytes
    parent_job_id: str = ""
    # Presigned GETs of the experiment's files the job reads (a follow-up query); see uploads.py.
    parent_artifacts: tuple[compute_pb2.ParentArtifact, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "request_json": self.request_json,
            "parent_result_json": self.parent_result_json,
            "parent_job_id": self.parent_job_id,
            "parent_artifacts": list(self.parent_artifacts),
        }


class ProviderClient:
    """One provider's stub with per-call deadlines and error translation."""

    def __init__(self, name: str, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self.name = name
        self._channel = channel
        self._stub = compute_pb2_grpc.ComputeProviderStub(channel)
        self._timeout_s = timeout_s

    async def _call(self, method: Callable[..., Awaitable[_T]], request: Any) -> _T:
        try:
            return await method(request, timeout=self._timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    def _error(self, exc: grpc.aio.AioRpcError) -> ProviderError:
        code = exc.code()
        PROVIDER_ERRORS.labels(self.name, code.name).inc()
        message = exc.details() or f"the {self.name} compute provider answered {code.name}"
        if code == grpc.StatusCode.UNAVAILABLE and not self._connected():
            message = f"the compute-{self.name} service could not be reached: {message}"
        # A message over gRPC's size limit fails the same way every time: never retry it.
        retryable = code in _RETRYABLE and not _TOO_LARGE.search(message)
        return ProviderError(self.name, code.name, message, retryable)

    def _connected(self) -> bool:
        """Whether the channel to the compute service is up: then an UNAVAILABLE came from the
        service itself (its cloud is unreachable) and its message already says which."""
        return self._channel.get_state() == grpc.ChannelConnectivity.READY

    async def verify_credentials(
        self, account: common_pb2.Account, api_key: str
    ) -> compute_pb2.VerifyCredentialsResponse:
        return await self._call(
            self._stub.VerifyCredentials,
            compute_pb2.VerifyCredentialsRequest(account=account, api_key=api_key),
        )

    async def prepare_account(
        self, account: common_pb2.Account, model_id: str, quantization: str, runpod_gpu: str = ""
    ) -> compute_pb2.PrepareAccountResponse:
        return await self._call(
            self._stub.PrepareAccount,
            compute_pb2.PrepareAccountRequest(
                account=account,
                model_id=model_id,
                model_params_b=model_params_b(model_id),
                quantization=quantization,
                runpod_gpu=runpod_gpu,
            ),
        )

    async def estimate(
        self, spec_json: bytes, backend: str, kind: str = "", request_json: bytes = b""
    ) -> common_pb2.Estimate:
        response = await self._call(
            self._stub.Estimate,
            compute_pb2.EstimateRequest(
                spec_json=spec_json, backend=backend, kind=kind, request_json=request_json
            ),
        )
        return response.estimate

    async def submit(
        self,
        job_id: str,
        account: common_pb2.Account,
        spec_json: bytes,
        estimated_cost_usd: float,
        estimated_time_s: float,
        later: LaterJob | None = None,
        artifact_uploads: list[compute_pb2.ArtifactUpload] | None = None,
        datasets: list[compute_pb2.DatasetFile] | None = None,
        webhook_url: str = "",
    ) -> str:
        response = await self._call(
            self._stub.Submit,
            compute_pb2.SubmitRequest(
                job_id=job_id,
                account=account,
                spec_json=spec_json,
                estimated_cost_usd=estimated_cost_usd,
                estimated_time_s=estimated_time_s,
                **(later.fields() if later is not None else {}),
                artifact_uploads=artifact_uploads or [],
                datasets=datasets or [],
                webhook_url=webhook_url,
            ),
        )
        return response.provider_job_id

    async def get_status(
        self, job_id: str, provider_job_id: str, account: common_pb2.Account, cursor: str
    ) -> compute_pb2.GetStatusResponse:
        return await self._call(
            self._stub.GetStatus,
            compute_pb2.GetStatusRequest(
                provider_job_id=provider_job_id, account=account, cursor=cursor, job_id=job_id
            ),
        )

    async def get_result(self, job_id: str, provider_job_id: str, account: common_pb2.Account) -> bytes:
        response = await self._call(
            self._stub.GetResult,
            compute_pb2.GetResultRequest(provider_job_id=provider_job_id, account=account, job_id=job_id),
        )
        return response.result_json

    async def fetch_artifact(
        self,
        job_id: str,
        provider_job_id: str,
        account: common_pb2.Account,
        name: str,
        timeout_s: float,
    ) -> AsyncGenerator[bytes, None]:
        """The artifact's bytes chunk by chunk, as the provider streams them."""
        request = compute_pb2.FetchArtifactRequest(
            provider_job_id=provider_job_id, account=account, job_id=job_id, name=name
        )
        try:
            async for chunk in self._stub.FetchArtifact(request, timeout=timeout_s):
                yield chunk.data
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc) from None

    async def describe_endpoint(self, account: common_pb2.Account) -> common_pb2.EndpointInfo:
        return await self._call(self._stub.DescribeEndpoint, compute_pb2.EndpointRequest(account=account))

    async def delete_endpoint(self, account: common_pb2.Account) -> common_pb2.EndpointInfo:
        return await self._call(self._stub.DeleteEndpoint, compute_pb2.EndpointRequest(account=account))

    async def cancel(self, job_id: str, provider_job_id: str, account: common_pb2.Account) -> None:
        await self._call(
            self._stub.Cancel,
            compute_pb2.CancelRequest(provider_job_id=provider_job_id, account=account, job_id=job_id),
        )


class Providers:
    """Lazily opened channels to every configured provider."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._clients: dict[str, ProviderClient] = {}
        self._channels: list[grpc.aio.Channel] = []

    def client(self, provider: ProviderName) -> ProviderClient:
        existing = self._clients.get(provider)
        if existing is not None:
            return existing
        address = self._settings.provider_address(provider)
        if not address:
            variable = f"COMPUTE_{provider.upper()}_ADDR"
            raise ProviderNotConfigured(
                f"the {provider} compute provider is not configured on this deployment ({variable} is empty)"
            )
        token = self._settings.compute_token
        channel = insecure_channel(address, caller_token=token.get_secret_value() if token else None)
        self._channels.append(channel)
        client = ProviderClient(provider, channel, self._settings.scheduler_provider_timeout_s)
        self._clients[provider] = client
        return client

    def configured(self, provider: ProviderName) -> bool:
        return bool(self._settings.provider_address(provider))

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()
        self._clients.clear()


def model_params_b(model_id: str) -> float:
    """Parameter count in billions from the cost model's catalog (the size the estimate prices),
    else as the id states it ("Foo-13B", "bar-270m"); 0 when neither says (the provider then
    picks its default GPU pool)."""
    card = cost_model.sized_model(model_id)
    return card.params_b if card is not None else 0.0

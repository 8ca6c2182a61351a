"""A small RunPod HTTP client: REST v2 (endpoints), the job API and GraphQL (account, balance).

Every call takes the API key as an argument (one client serves every user) and sends it only in
the Authorization header. Messages raised from here never include headers or the key.

Retries: a 429 is retried with exponential backoff plus jitter, waiting at least Retry-After (a
rejected request was not accepted, so this is safe even for /run); 5xx and read errors only for
idempotent calls; a connection that could not be opened (nothing was sent) for every call.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from typing import Any

import httpx

from compute_runpod.config import Settings
from compute_runpod.errors import Code, ProviderError
from compute_runpod.metrics import RUNPOD_API_CALLS

log = logging.getLogger(__name__)

MYSELF_QUERY = "query { myself { id clientBalance } }"

_SCOPE_NEEDED = {
    "graphql": "read access to the account (GraphQL), used to check the key and the balance",
    "serverless": "Read/Write access to serverless endpoints, used to create and manage the "
    "dashboard's endpoint",
    "templates": "read access to templates, used to roll the dashboard's worker template out to its endpoint",
    "job": "access to run jobs on the dashboard's serverless endpoint",
}


class RunPodClient:
    def __init__(self, settings: Settings, http: httpx.AsyncClient | None = None) -> None:
        self._settings = settings
        self._http = http or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.runpod_http_timeout_s, connect=10.0)
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- account -----------------------------------------------------------------------

    async def myself(self, key: str) -> dict[str, Any] | None:
        """``{"id", "clientBalance"}`` of the key's account, or None when RunPod knows no user."""
        response = await self._request(
            "graphql",
            "POST",
            self._settings.runpod_graphql_url,
            key,
            json={"query": MYSELF_QUERY},
            idempotent=True,
        )
        body = _json(response)
        if response.status_code != 200:
            raise _unexpected("checking the account", response)
        data = body.get("data") if isinstance(body, dict) else None
        myself = data.get("myself") if isinstance(data, dict) else None
        if myself is None and isinstance(body, dict) and body.get("errors") and data is None:
            message = "; ".join(str(e.get("message", e)) for e in body["errors"])
            raise ProviderError(Code.UNAVAILABLE, f"RunPod could not read the account: {message}")
        return myself if isinstance(myself, dict) else None

    # ---- endpoints (REST v2) -----------------------------------------------------------

    async def list_endpoints(self, key: str) -> list[dict[str, Any]]:
        response = await self._rest("serverless.list", "/serverless", key)
        body = _ok(response, "listing your serverless endpoints")
        endpoints = body.get("endpoints", []) if isinstance(body, dict) else body
        return [e for e in endpoints or [] if isinstance(e, dict)]

    async def get_endpoint(self, key: str, endpoint_id: str) -> dict[str, Any] | None:
        response = await self._rest("serverless.get", f"/serverless/{endpoint_id}", key)
        return _found(response, "reading the serverless endpoint")

    async def create_endpoint(self, key: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._rest(
            "serverless.create", "/serverless", key, method="POST", json=body, idempotent=False
        )
        if response.status_code not in (200, 201):
            raise _unexpected("creating the serverless endpoint", response)
        created = _json(response)
        if not isinstance(created, dict) or not created.get("id"):
            raise ProviderError(Code.UNAVAILABLE, "RunPod created the endpoint but returned no id")
        return created

    async def update_endpoint(self, key: str, endpoint_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """PATCH: a partial update; container changes roll out as a release as workers cycle."""
        response = await self._rest(
            "serverless.update", f"/serverless/{endpoint_id}", key, method="PATCH", json=body
        )
        return _ok(response, "updating the serverless endpoint")

    async def delete_endpoint(self, key: str, endpoint_id: str) -> bool:
        """DELETE: RunPod also terminates the workers and cancels queued and running jobs.
        False when RunPod no longer has the endpoint."""
        response = await self._rest("serverless.delete", f"/serverless/{endpoint_id}", key, method="DELETE")
        if response.status_code == 404:
            return False
        if response.status_code not in (200, 204):
            raise _unexpected("deleting the serverless endpoint", response)
        return True

    async def get_template(self, key: str, template_id: str) -> dict[str, Any]:
        response = await self._rest("templates.get", f"/templates/{template_id}", key)
        body = _ok(response, f"reading the worker template {template_id}")
        return body if isinstance(body, dict) else {}

    async def endpoint_workers(self, key: str, endpoint_id: str) -> dict[str, Any]:
        """The workers summary: running, idle, initializing, throttled, unhealthy, total."""
        response = await self._rest("serverless.workers", f"/serverless/{endpoint_id}/workers", key)
        body = _ok(response, "reading the endpoint's workers")
        summary = body.get("summary") if isinstance(body, dict) else None
        return summary if isinstance(summary, dict) else {}

    # ---- jobs --------------------------------------------------------------------------

    async def run(self, key: str, endpoint_id: str, payload: dict[str, Any]) -> dict[str, Any]:
        response = await self._request(
            "job.run",
            "POST",
            f"{self._settings.runpod_job_base_url}/{endpoint_id}/run",
            key,
            json=payload,
            idempotent=False,
            # A /run that left and got no clear answer may have created a job: never UNAVAILABLE
            # (which the scheduler retries), so that it is reconciled, not sent again.
            unsure=Code.UNKNOWN,
        )
        if response.status_code == 404:
            raise ProviderError(
                Code.FAILED_PRECONDITION,
                "RunPod does not know the endpoint this job was sent to; prepare the account "
                "again to recreate it",
            )
        body = _ok(response, "submitting the job")
        if not isinstance(body, dict) or not body.get("id"):
            raise ProviderError(Code.UNAVAILABLE, "RunPod accepted the job but returned no job id")
        return body

    async def status(self, key: str, endpoint_id: str, job_id: str) -> dict[str, Any] | None:
        return await self._job_get("job.status", f"{endpoint_id}/status/{job_id}", key)

    async def stream(self, key: str, endpoint_id: str, job_id: str, wait_ms: int) -> dict[str, Any] | None:
        return await self._job_get(
            "job.stream",
            f"{endpoint_id}/stream/{job_id}",
            key,
            params={"wait": wait_ms},
            timeout=self._settings.runpod_http_timeout_s + wait_ms / 1000,
        )

    async def health(self, key: str, endpoint_id: str) -> dict[str, Any]:
        """The endpoint's job counts (``jobs``: inQueue, inProgress, ...) and workers."""
        body = await self._job_get("job.health", f"{endpoint_id}/health", key)
        if body is None:
            raise ProviderError(Code.NOT_FOUND, "RunPod does not know the endpoint")
        return body

    async def cancel(self, key: str, endpoint_id: str, job_id: str) -> dict[str, Any] | None:
        response = await self._request(
            "job.cancel",
            "POST",
            f"{self._settings.runpod_job_base_url}/{endpoint_id}/cancel/{job_id}",
            key,
            idempotent=True,
        )
        return _found(response, "cancelling the job")

    async def _job_get(
        self,
        route: str,
        path: str,
        key: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any] | None:
        response = await self._request(
            route,
            "GET",
            f"{self._settings.runpod_job_base_url}/{path}",
            key,
            params=params,
            idempotent=True,
            timeout=timeout,
        )
        body = _found(response, "reading the job")
        return body if isinstance(body, dict) else None

    # ---- transport ---------------------------------------------------------------------

    async def _rest(
        self,
        route: str,
        path: str,
        key: str,
        method: str = "GET",
        json: dict[str, Any] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """A call of the REST API: ``path`` under the REST base URL."""
        return await self._request(
            route,
            method,
            f"{self._settings.runpod_rest_base_url}{path}",
            key,
            json=json,
            idempotent=idempotent,
        )

    async def _request(
        self,
        route: str,
        method: str,
        url: str,
        key: str,
        *,
        idempotent: bool,
        json: Any = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        unsure: Code = Code.UNAVAILABLE,
    ) -> httpx.Response:
        """``unsure``: the code of a failure after a call that is not idempotent had left."""
        settings = self._settings
        headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
        for attempt in range(1, settings.runpod_max_attempts + 1):
            last = attempt == settings.runpod_max_attempts
            try:
                response = await self._http.request(
                    method,
                    url,
                    headers=headers,
                    json=json,
                    params=params,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # The connection never opened, so RunPod cannot have received the request.
                RUNPOD_API_CALLS.labels(route, "connect_error").inc()
                if last:
                    raise ProviderError(
                        Code.UNAVAILABLE,
                        f"Cannot reach RunPod ({httpx.URL(url).host}): {type(exc).__name__}",
                    ) from None
                await asyncio.sleep(self._backoff(attempt))
                continue
            except httpx.TransportError as exc:
                RUNPOD_API_CALLS.labels(route, "transport_error").inc()
                if idempotent and not last:
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                detail = _not_sent_again(idempotent, "received")
                raise ProviderError(
                    Code.UNAVAILABLE if idempotent else unsure,
                    f"RunPod did not answer ({type(exc).__name__}).{detail}",
                ) from None
            RUNPOD_API_CALLS.labels(route, str(response.status_code)).inc()
            status = response.status_code
            if status == 429:
                wait = max(self._backoff(attempt), _retry_after_s(response))
                if last or wait > settings.runpod_retry_max_wait_s:
                    raise ProviderError(
                        Code.RESOURCE_EXHAUSTED,
                        f"RunPod is rate limiting requests (HTTP 429 after {attempt} attempts); "
                        "try again in a minute",
                    )
                log.info("runpod rate limited", extra={"route": route, "wait_s": round(wait, 2)})
                await asyncio.sleep(wait)
                continue
            if status >= 500:
                if idempotent and not last:
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                detail = _not_sent_again(idempotent, "accepted")
                raise ProviderError(
                    Code.UNAVAILABLE if idempotent else unsure,
                    f"RunPod answered with a server error (HTTP {status}).{detail}",
                )
            if status == 401:
                raise ProviderError(Code.UNAUTHENTICATED, "Invalid RunPod API key")
            if status == 403:
                needed = _SCOPE_NEEDED[route.split(".", 1)[0]]
                raise ProviderError(
                    Code.PERMISSION_DENIED,
                    f"This RunPod API key lacks a permission the dashboard needs: {needed}. "
                    "Create a key with 'All' access, or a restricted key with GraphQL read and "
                    "serverless Read/Write.",
                )
            return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with full jitter."""
        ceiling = self._settings.runpod_retry_base_s * (2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)


def _retry_after_s(response: httpx.Response) -> float:
    value = response.headers.get("Retry-After")
    if not value:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, moment.timestamp() - time.time())


def _not_sent_again(idempotent: bool, verb: str) -> str:
    """What an error adds when a call that is not safe to repeat failed after it left."""
    return "" if idempotent else f" RunPod may or may not have {verb} it; it was not sent again."


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


def _found(response: httpx.Response, action: str) -> Any:
    """The JSON body of a 200, None for a 404 (RunPod knows no such thing), else the refusal."""
    if response.status_code == 404:
        return None
    return _ok(response, action)


def _ok(response: httpx.Response, action: str) -> Any:
    """The JSON body of a 200, else the refusal of ``action``."""
    if response.status_code != 200:
        raise _unexpected(action, response)
    return _json(response)


def _unexpected(action: str, response: httpx.Response) -> ProviderError:
    body = _json(response)
    detail = ""
    if isinstance(body, dict):
        detail = str(body.get("detail") or body.get("error") or body.get("message") or "")
    code = Code.INVALID_ARGUMENT if response.status_code in (400, 422) else Code.UNAVAILABLE
    suffix = f": {detail[:300]}" if detail else ""
    return ProviderError(code, f"RunPod refused {action} (HTTP {response.status_code}){suffix}")

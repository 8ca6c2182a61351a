"""compute-runpod's behaviour, free of gRPC: verify keys, prepare the endpoint, submit, follow,
fetch results and cancel, on the user's own RunPod account or the operator's (hosted tier).

The key is fetched per call (``reveal_key``) and lives only in that call's local variables.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from compute_runpod import costs
from compute_runpod.client import RunPodClient
from compute_runpod.config import Settings
from compute_runpod.errors import Code, KeyFailure, ProviderError
from compute_runpod.locks import KeyedLocks
from compute_runpod.results import (
    NO_OUTPUT,
    artifact_data,
    error_text,
    final_result,
    is_artifact_chunk,
    is_result_chunk,
)
from gpu_core import schemas
from gpu_core.hf_token import HF_TOKEN_FIELD
from gpu_core.jobs import EXPERIMENT, JobInputError, make_payload, parse_payload
from gpu_core.schemas import RUNPOD_ALL_FITTING, ExperimentSpec
from gpu_core.uploads import presigned_expiry

log = logging.getLogger(__name__)

WAITING_FOR_GPU = "waiting for a GPU worker (cold start can take 30-120 s)"
# A job RunPod keeps queued with no GPU free: what the researcher can do about it (the job page
# offers to widen the pools and to move the job to the hosted backend).
NO_GPU_ACTIONS = (
    "run it again later, on every GPU type that fits the model whatever its price (spec "
    'runpod_gpu "all-fitting"), or on the hosted backend (Settings -> Compute)'
)
RESULT_EXPIRED = (
    "RunPod no longer has this job: RunPod keeps a result for 30 minutes after a job finishes, "
    "and drops a job still queued when its ttl ends (kept within its upload URLs' life); the "
    "worker's copy of a result, if it finished, is in the artifact store"
)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}
# In the endpoint's env: the template it was created from or last moved to.
TEMPLATE_MARKER = "INFLUENCE_TEMPLATE_ID"
# The endpoint's page in RunPod's console (the key page is console.runpod.io/user/credentials).
CONSOLE_ENDPOINT_URL = "https://console.runpod.io/serverless/user/endpoint/{endpoint_id}"
_WORKER_COUNTS = ("running", "idle", "initializing", "throttled", "unhealthy", "total")
_REMEMBERED_JOBS = 10_000
# The smallest ttl sent (RUNPOD_JOB_TTL_S's floor): less cannot both wait for a worker and run.
_MIN_JOB_TTL_S = 10

RevealKey = Callable[[str], Awaitable[str]]


async def _no_hf_token(_user_id: str) -> str:
    return ""


def usd(amount: float) -> str:
    """Dollars: cents from $1 up, two significant digits below (a tiny job costs fractions of a
    cent, and "$0.00 vs $0.01" would hide the comparison the researcher needs)."""
    if amount == 0 or abs(amount) >= 1:
        return f"${amount:,.2f}"
    decimals = max(2, 1 - math.floor(math.log10(abs(amount))))
    return f"${amount:.{decimals}f}"


@dataclass(frozen=True)
class AccountRef:
    user_id: str
    endpoint_id: str = ""
    hosted: bool = False


@dataclass(frozen=True)
class Verification:
    account_id: str
    balance_usd: float
    message: str
    failure: KeyFailure | None = None  # set: the key was refused, and this is why

    @property
    def valid(self) -> bool:
        return self.failure is None


# What RunPod's answer to a key check means for the key; other errors are failures of the call.
_KEY_FAILURES = {
    Code.UNAUTHENTICATED: KeyFailure.INVALID,
    Code.PERMISSION_DENIED: KeyFailure.NO_PERMISSION,
    Code.UNAVAILABLE: KeyFailure.UNREACHABLE,
}


def _refused(failure: KeyFailure, message: str) -> Verification:
    return Verification(account_id="", balance_usd=0.0, message=message, failure=failure)


@dataclass(frozen=True)
class Prepared:
    endpoint_id: str
    created: bool
    status: str


@dataclass(frozen=True)
class EndpointView:
    """A researcher's endpoint as RunPod reports it now (see common.proto EndpointInfo)."""

    byok_available: bool
    unavailable_reason: str
    state: str  # none | live | gone | unknown
    endpoint_id: str = ""
    name: str = ""
    gpu_pools: tuple[str, ...] = ()
    workers_max: int = 0
    workers: dict[str, int] = field(default_factory=dict)
    execution_timeout_s: int = 0
    console_url: str = ""


@dataclass
class StatusReport:
    state: str  # a JobState name without the prefix: SUBMITTED, RUNNING, COMPLETED, ...
    events: list[dict[str, Any]]
    cursor: str
    error: str = ""
    result_ready: bool = False
    stage_message: str = ""
    usage: Usage | None = None  # once the job has ended: RunPod's own timing of it


@dataclass(frozen=True)
class Usage:
    """What RunPod measured of a job that ended: ``executionTime`` (what it bills) and
    ``delayTime`` (queue and cold start), from /status, in seconds."""

    gpu_seconds: float
    delay_seconds: float
    source: str = "RunPod executionTime"


def _usage(status: dict[str, Any]) -> Usage:
    def seconds(name: str) -> float:
        try:
            return max(float(status.get(name) or 0), 0.0) / 1000
        except (TypeError, ValueError):
            return 0.0

    return Usage(seconds("executionTime"), seconds("delayTime"))


@dataclass
class _Followed:
    """Chunks of one job received from /stream (which drains) and not lost on the next poll.
    ``chunks[i]`` is the job's chunk number ``base + i``."""

    base: int
    first_seen: float
    chunks: list[Any] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # While queued: the last look at the endpoint's workers (monotonic time) and what it said.
    looked_at: float = 0.0
    queue_note: str = ""


class RunPodProvider:
    def __init__(
        self,
        settings: Settings,
        client: RunPodClient,
        reveal_key: RevealKey,
        reveal_hf_token: RevealKey = _no_hf_token,
    ) -> None:
        self._settings = settings
        self._client = client
        self._reveal_key = reveal_key
        # The user's own Hugging Face token ("" when none), revealed per submit like the key.
        self._reveal_hf_token = reveal_hf_token
        self._followed: dict[str, _Followed] = {}
        self._failures: OrderedDict[str, str] = OrderedDict()
        self._submitted: OrderedDict[str, str] = OrderedDict()
        # Each submitted job's own execution timeout (s), for the message when RunPod stops it.
        self._timeouts: OrderedDict[str, str] = OrderedDict()
        self._submit_locks = KeyedLocks()
        self._account_locks = KeyedLocks()

    # ---- keys ----------------------------------------------------------------------------

    async def _key(self, account: AccountRef) -> str:
        if account.hosted:
            key = self._settings.runpod_api_key.get_secret_value()
            if not key:
                raise ProviderError(
                    Code.FAILED_PRECONDITION,
                    "The hosted RunPod tier is not configured (RUNPOD_API_KEY is empty)",
                )
            return key
        if not account.user_id:
            raise ProviderError(Code.INVALID_ARGUMENT, "account.user_id is required")
        return await self._reveal_key(account.user_id)

    def _endpoint(self, account: AccountRef) -> str:
        endpoint = self._settings.runpod_hosted_endpoint_id if account.hosted else account.endpoint_id
        if not endpoint:
            raise ProviderError(
                Code.FAILED_PRECONDITION,
                "The hosted RunPod tier has no endpoint (RUNPOD_HOSTED_ENDPOINT_ID is empty)"
                if account.hosted
                else "No RunPod endpoint is set up for this account yet; prepare the account first",
            )
        return endpoint

    # ---- credentials ---------------------------------------------------------------------

    def _byok_unavailable(self) -> str:
        """Why researchers' own keys cannot run jobs on this server ("" = they can)."""
        if self._settings.runpod_template_id:
            return ""
        return (
            "RunPod is not set up on this server for researchers' own keys: its operator has not "
            "set RUNPOD_TEMPLATE_ID (the worker template endpoints are created from)"
        )

    async def verify(self, account: AccountRef, api_key: str = "") -> Verification:
        """Validity through REST v2 (listing the serverless endpoints: 401 invalid, 403 lacking
        scope), then the balance through GraphQL while RunPod still answers it (it is deprecated
        and retires in 2027; REST v2 has no balance). A valid key whose balance cannot be read
        is accepted with a note saying so: spend stays bounded by the execution timeout. A refused
        key is an answer (its failure says why), not an error; the stored key's absence is one."""
        unavailable = "" if account.hosted else self._byok_unavailable()
        if unavailable:
            # Saving a key that no job could use would only fail the first job.
            raise ProviderError(Code.FAILED_PRECONDITION, unavailable + "; your key was not saved")
        key = api_key or await self._key(account)
        try:
            await self._client.list_endpoints(key)
        except ProviderError as exc:
            failure = _KEY_FAILURES.get(exc.code)
            if failure is None:
                raise
            return _refused(failure, exc.message)
        balance = await self._read_balance(key)
        if isinstance(balance, str):
            return Verification(account_id="", balance_usd=-1.0, message=self._balance_unread(balance))
        amount, account_id = balance
        if amount <= 0:
            return _refused(KeyFailure.NO_FUNDS, "Your RunPod balance is $0; add credits at runpod.io")
        message = f"RunPod key is valid; balance {usd(amount)}"
        if amount < self._settings.runpod_low_balance_usd:
            message += " (low: add credits at runpod.io before long runs)"
        return Verification(account_id=account_id, balance_usd=amount, message=message)

    def _balance_unread(self, why: str) -> str:
        limit_h = self._settings.runpod_execution_timeout_s / 3600
        return (
            f"RunPod key is valid, but its balance could not be read ({why}), so the dashboard "
            "cannot check it before your jobs: keep an eye on it at runpod.io. RunPod stops "
            f"every job at the execution timeout ({limit_h:g} h), which bounds what one job "
            "can spend."
        )

    async def _read_balance(self, key: str) -> tuple[float, str] | str:
        """(balance, account id), or why it could not be read."""
        try:
            myself = await self._client.myself(key)
        except ProviderError as exc:
            return f"RunPod's account API (GraphQL) did not answer: {exc.message}"
        if myself is None:
            return "RunPod's account API (GraphQL) returned no account for this key"
        try:
            balance = float(myself.get("clientBalance") or 0.0)
        except (TypeError, ValueError):
            return "RunPod's account API (GraphQL) returned a balance that is not a number"
        return balance, str(myself.get("id") or "")

    # ---- endpoint ------------------------------------------------------------------------

    async def prepare(
        self,
        account: AccountRef,
        model_params_b: float = 0.0,
        quantization: str = "",
        model_id: str = "",
        runpod_gpu: str = "",
    ) -> Prepared:
        """The researcher's endpoint, its pools fitted to this job (``runpod_gpu``: the spec's
        choice, see costs.gpu_pools), created on first need."""
        key = await self._key(account)
        if account.hosted:
            endpoint = self._endpoint(account)
            if await self._client.get_endpoint(key, endpoint) is None:
                raise ProviderError(
                    Code.FAILED_PRECONDITION,
                    "The hosted RunPod endpoint (RUNPOD_HOSTED_ENDPOINT_ID) does not exist",
                )
            return Prepared(endpoint_id=endpoint, created=False, status="ready")
        # One user's concurrent first jobs must create one endpoint, not one each.
        async with self._account_locks.hold(account.user_id):
            existing = None
            if account.endpoint_id:
                existing = await self._client.get_endpoint(key, account.endpoint_id)
            if existing is None:
                existing = await self._find_own_endpoint(key)
            if existing is not None:
                await self._update_endpoint(key, existing, model_params_b, quantization, model_id, runpod_gpu)
                return Prepared(endpoint_id=str(existing["id"]), created=False, status="ready")
            created = await self._client.create_endpoint(
                key, self._endpoint_body(model_params_b, quantization, model_id, runpod_gpu)
            )
            log.info("runpod endpoint created", extra={"endpoint_id": created["id"]})
            return Prepared(endpoint_id=str(created["id"]), created=True, status="ready")

    async def _find_own_endpoint(self, key: str) -> dict[str, Any] | None:
        """An endpoint this dashboard created earlier (e.g. before its id reached the profile):
        our name and our marker in its env. An endpoint the researcher made themselves under
        the same name has no marker and is left alone (RunPod names need not be unique), never
        adopted and patched."""
        for endpoint in await self._client.list_endpoints(key):
            env = endpoint.get("env")
            ours = isinstance(env, dict) and bool(env.get(TEMPLATE_MARKER))
            if endpoint.get("name") == self._settings.runpod_endpoint_name and endpoint.get("id") and ours:
                return endpoint
        return None

    async def describe_endpoint(self, account: AccountRef) -> EndpointView:
        """The stored endpoint as RunPod lists it now: "gone" when RunPod no longer has it
        (deleted in its console), so the caller stops calling it ready."""
        unavailable = self._byok_unavailable()
        if not account.endpoint_id:
            return EndpointView(not unavailable, unavailable, "none")
        key = await self._key(account)
        endpoint = await self._client.get_endpoint(key, account.endpoint_id)
        if endpoint is None:
            return EndpointView(not unavailable, unavailable, "gone", endpoint_id=account.endpoint_id)
        summary = await self._client.endpoint_workers(key, account.endpoint_id)
        gpu, workers = (_object(endpoint.get(name)) for name in ("gpu", "workers"))
        return EndpointView(
            byok_available=not unavailable,
            unavailable_reason=unavailable,
            state="live",
            endpoint_id=account.endpoint_id,
            name=str(endpoint.get("name") or ""),
            gpu_pools=tuple(str(pool) for pool in gpu.get("pools") or []),
            workers_max=_count(workers.get("max")),
            workers={name: _count(summary.get(name)) for name in _WORKER_COUNTS},
            execution_timeout_s=_count(endpoint.get("timeout")) // 1000,
            console_url=CONSOLE_ENDPOINT_URL.format(endpoint_id=account.endpoint_id),
        )

    async def delete_endpoint(self, account: AccountRef) -> EndpointView:
        """Delete the stored endpoint on the researcher's account (RunPod cancels whatever still
        runs there and stops its workers); one already gone is not an error."""
        if account.hosted:
            raise ProviderError(
                Code.FAILED_PRECONDITION,
                "The hosted tier's endpoint is the operator's; it cannot be deleted here",
            )
        unavailable = self._byok_unavailable()
        if account.endpoint_id:
            key = await self._key(account)
            existed = await self._client.delete_endpoint(key, account.endpoint_id)
            log.info(
                "runpod endpoint deleted", extra={"endpoint_id": account.endpoint_id, "existed": existed}
            )
        return EndpointView(not unavailable, unavailable, "none")

    async def _update_endpoint(
        self,
        key: str,
        endpoint: dict[str, Any],
        model_params_b: float,
        quantization: str,
        model_id: str,
        runpod_gpu: str = "",
    ) -> None:
        """Before each job: the endpoint's GPU pools refitted to this job's model (see
        _may_change_pools), and the worker template rolled out when RUNPOD_TEMPLATE_ID changed,
        in one PATCH (same id, so jobs in flight keep their endpoint)."""
        update = await self._template_update(key, endpoint)
        wanted = self._pools(model_params_b, quantization, model_id, runpod_gpu)
        current = [str(pool) for pool in _object(endpoint.get("gpu")).get("pools") or []]
        tier_gb = costs.endpoint_tier_gb(model_id, quantization) if model_id else 0
        if current != wanted and await self._may_change_pools(key, str(endpoint["id"]), current, tier_gb):
            update["gpu"] = {"pools": wanted, "count": 1}
        if not update:
            return
        await self._client.update_endpoint(key, str(endpoint["id"]), update)
        log.info(
            "runpod endpoint updated",
            extra={"endpoint_id": endpoint["id"], "fields": sorted(update), "pools": update.get("gpu")},
        )

    async def _may_change_pools(self, key: str, endpoint_id: str, current: list[str], tier_gb: int) -> bool:
        """One endpoint per researcher, its pools refitted before each job (docs/services.md,
        "RunPod GPU pools"). Pools that do not fit this job are always replaced: every pool
        that fits a bigger model also fits the smaller jobs still queued (they may cost more).
        Pools that fit but were chosen for a bigger model are narrowed only when RunPod holds no
        job of the endpoint (queued or running), since narrowing could strand a queued big job
        on a GPU too small for it; until then this job runs on the current pools."""
        fits = bool(current) and min(costs.pool_memory_gb(pool) for pool in current) >= tier_gb
        if not fits:
            return True
        jobs = _object((await self._client.health(key, endpoint_id)).get("jobs"))
        return _count(jobs.get("inQueue")) + _count(jobs.get("inProgress")) == 0

    async def _template_update(self, key: str, endpoint: dict[str, Any]) -> dict[str, Any]:
        """RunPod resolves a template only when an endpoint is created, and its Endpoint object
        does not say which one: the endpoint carries our own marker in its env. When
        RUNPOD_TEMPLATE_ID has changed, the fields of the new template's container settings
        (RunPod rolls the release out as workers cycle); else nothing."""
        template_id = self._settings.runpod_template_id
        env = endpoint.get("env")
        if not isinstance(env, dict):
            env = {}
        if not template_id or env.get(TEMPLATE_MARKER) == template_id:
            return {}
        template = await self._client.get_template(key, template_id)
        update: dict[str, Any] = {
            field: template[field] for field in ("image", "args", "disk", "ports") if field in template
        }
        update["env"] = {**(template.get("env") or {}), TEMPLATE_MARKER: template_id}
        log.info(
            "runpod endpoint moves to a new template",
            extra={"endpoint_id": endpoint["id"], "template_id": template_id},
        )
        return update

    def _pools(
        self, model_params_b: float, quantization: str, model_id: str, runpod_gpu: str = ""
    ) -> list[str]:
        band = self._settings.runpod_pool_price_band
        pools = costs.gpu_pools(model_params_b, quantization, model_id, band, runpod_gpu)
        return pools or list(self._settings.runpod_default_gpu_pools)

    def _endpoint_body(
        self, model_params_b: float, quantization: str, model_id: str, runpod_gpu: str = ""
    ) -> dict[str, Any]:
        settings = self._settings
        if not settings.runpod_template_id:
            raise ProviderError(
                Code.FAILED_PRECONDITION,
                "RunPod is not set up on this server (RUNPOD_TEMPLATE_ID is empty)",
            )
        return {
            "name": settings.runpod_endpoint_name,
            "type": "QUEUE",
            "templateId": settings.runpod_template_id,
            "env": {TEMPLATE_MARKER: settings.runpod_template_id},
            "gpu": {"pools": self._pools(model_params_b, quantization, model_id, runpod_gpu), "count": 1},
            "workers": {
                "min": 0,
                "max": settings.runpod_workers_max,
                "idleTimeout": settings.runpod_idle_timeout_s,
            },
            "scaling": {"type": "QUEUE_DELAY", "queueDelay": 4},
            "timeout": settings.runpod_execution_timeout_s * 1000,
            "flashboot": "FLASHBOOT",
        }

    # ---- jobs ----------------------------------------------------------------------------

    # Same shape as compute-modal's submit: the parameter list mirrors compute.proto's
    # SubmitRequest, which each provider takes in its own service.
    async def submit(
        self,
        job_id: str,
        account: AccountRef,
        spec_json: bytes,
        estimated_cost_usd: float = 0.0,
        kind: str = "",
        request_json: bytes = b"",
        parent_result_json: bytes = b"",
        upload_urls: dict[str, str] | None = None,
        parent_artifacts: list[dict[str, Any]] | None = None,
        estimated_time_s: float = 0.0,
        datasets: list[dict[str, Any]] | None = None,
        webhook_url: str = "",
    ) -> str:
        """``kind``: a later job of the experiment ``spec_json`` (gpu_core.jobs), e.g. a
        counterfactual check with its request and the experiment's result. ``upload_urls``: the
        scheduler's presigned PUT URL per artifact name of an experiment (for a later job only its
        worker's two records: claim and result); without them an experiment's files
        come back inline, and a job whose score matrix alone exceeds that ceiling is refused
        here, before anything is paid for. ``parent_artifacts``: presigned GETs of the
        experiment's files a follow-up query reads (the worker downloads them). ``datasets``:
        presigned GETs of the stored datasets the spec names (gpu_core.datasets). ``webhook_url``:
        where RunPod posts when the job finishes (it only wakes the scheduler's poll early)."""
        spec = parse_spec(spec_json)
        job_input = worker_input(spec, kind, request_json, parent_result_json)
        if parent_artifacts:
            job_input["parent_artifacts"] = parent_artifacts
        if datasets:
            job_input["datasets"] = datasets
        if kind in ("", EXPERIMENT):
            job_input["artifact_transport"] = self._artifact_transport(job_id, spec, upload_urls or {})
        elif upload_urls:
            # A later job writes no files, but its worker claims our job id and keeps its result
            # in the store through the scheduler's URLs for its two records, as an experiment's.
            job_input["artifact_transport"] = {"mode": "presigned", "urls": upload_urls, "job_id": job_id}
        ttl_s = self._job_ttl_s(upload_urls or {})
        endpoint = self._endpoint(account)
        async with self._submit_locks.hold(job_id) if job_id else contextlib.nullcontext():
            if job_id and job_id in self._submitted:
                return self._submitted[job_id]
            key = await self._key(account)
            if not account.hosted:
                await self._check_balance(key, spec, estimated_cost_usd)
            hf_token = await self._reveal_hf_token(account.user_id) if account.user_id else ""
            timeout_s = self.execution_timeout_s(estimated_time_s)
            payload: dict[str, Any] = {
                # The token travels in this one call's input only: the worker sets HF_TOKEN from
                # it while the model loads, and nothing here logs the payload.
                "input": {**job_input, HF_TOKEN_FIELD: hf_token} if hf_token else job_input,
                "policy": {
                    "executionTimeout": timeout_s * 1000,
                    "ttl": ttl_s * 1000,
                },
            }
            if webhook_url:
                payload["webhook"] = webhook_url
            accepted = await self._client.run(key, endpoint, payload)
            provider_job_id = str(accepted["id"])
            _remember(self._timeouts, provider_job_id, str(timeout_s))
            if job_id:
                _remember(self._submitted, job_id, provider_job_id)
            log.info("runpod job submitted", extra={"job_id": job_id, "runpod_job_id": provider_job_id})
            return provider_job_id

    def execution_timeout_s(self, estimated_time_s: float) -> int:
        """The job's own policy.executionTimeout: its estimate with headroom (estimates err, a cold
        worker downloads the model), within [RUNPOD_MIN_EXECUTION_TIMEOUT_S, the endpoint's
        RUNPOD_EXECUTION_TIMEOUT_S]. No estimate: the endpoint's."""
        settings = self._settings
        ceiling = settings.runpod_execution_timeout_s
        if estimated_time_s <= 0:
            return ceiling
        wanted = math.ceil(estimated_time_s * settings.runpod_timeout_headroom)
        return min(max(wanted, settings.runpod_min_execution_timeout_s), ceiling)

    def _job_ttl_s(self, upload_urls: dict[str, str]) -> int:
        """The job's RunPod ttl (queue wait and run together): RUNPOD_JOB_TTL_S, kept within
        the life left to its upload URLs, so that RunPod drops a job from its queue (unrun,
        unpaid) rather than run it to an end whose files and result can no longer be stored."""
        ttl_s = self._settings.runpod_job_ttl_s
        expiries = [presigned_expiry(url) for url in upload_urls.values()]
        known = [expiry for expiry in expiries if expiry is not None]
        if not known:
            return ttl_s
        left_s = int(min(known) - time.time())
        if left_s < _MIN_JOB_TTL_S:
            raise ProviderError(
                Code.FAILED_PRECONDITION,
                f"The job's upload URLs expire in {max(left_s, 0)} s, too soon to run it; the "
                "scheduler mints them (SCHEDULER_UPLOAD_URL_TTL_S). Nothing was submitted.",
            )
        return min(ttl_s, left_s)

    def _artifact_transport(
        self, job_id: str, spec: ExperimentSpec, upload_urls: dict[str, str]
    ) -> dict[str, Any]:
        """What the worker does with the run's files (see worker/handler.py); with presigned
        URLs, also our job id, which the worker's claim object records."""
        if upload_urls:
            return {"mode": "presigned", "urls": upload_urls, "job_id": job_id}
        ceiling = self._settings.runpod_inline_artifacts_max_bytes
        matrix_bytes = scores_npy_bytes(spec.n_eval, spec.n_train)
        if matrix_bytes > ceiling:
            raise ProviderError(
                Code.FAILED_PRECONDITION,
                f"This job's score matrix alone ({spec.n_eval} eval x "
                f"{spec.n_train} training examples, {matrix_bytes / 1e6:.1f} MB) is over "
                f"the {ceiling / 1e6:.1f} MB that can come back through RunPod's job API, and this "
                "dashboard's artifact store is not reachable from RunPod (its operator must set "
                "ARTIFACT_STORE_URL to an S3-compatible bucket). Use fewer examples. Nothing was "
                "submitted.",
            )
        return {"mode": "inline", "max_bytes": ceiling}

    async def _check_balance(self, key: str, spec: ExperimentSpec, estimated_cost_usd: float) -> None:
        estimate = estimated_cost_usd if estimated_cost_usd > 0 else costs.estimated_cost_usd(spec)
        read = await self._read_balance(key)
        if isinstance(read, str):
            # The key was valid when saved; the execution timeout still bounds the job's spend.
            log.info("runpod balance unknown; submitting without the balance check", extra={"reason": read})
            return
        balance, _ = read
        if balance <= 0:
            raise ProviderError(
                Code.FAILED_PRECONDITION, "Your RunPod balance is $0; add credits at runpod.io"
            )
        if balance < estimate:
            raise ProviderError(
                Code.FAILED_PRECONDITION,
                f"Your RunPod balance is {usd(balance)} but this job is estimated to cost "
                f"{usd(estimate)}; add credits at runpod.io. Nothing was submitted.",
            )

    async def status(self, account: AccountRef, provider_job_id: str, cursor: str) -> StatusReport:
        delivered = parse_cursor(cursor)
        if provider_job_id in self._failures:
            return StatusReport("FAILED", [], str(delivered), error=self._failures[provider_job_id])
        endpoint = self._endpoint(account)
        key = await self._key(account)
        followed = self._followed.setdefault(
            provider_job_id, _Followed(base=delivered, first_seen=time.monotonic())
        )
        async with followed.lock:
            report = await self._poll(key, endpoint, provider_job_id, followed, delivered)
        if report.state in {"COMPLETED", "FAILED", "CANCELLED"}:
            self._followed.pop(provider_job_id, None)
        return report

    async def _poll(
        self, key: str, endpoint: str, job: str, followed: _Followed, delivered: int
    ) -> StatusReport:
        stream = await self._client.stream(key, endpoint, job, self._settings.runpod_stream_wait_ms)
        if stream is not None:
            followed.chunks.extend(
                chunk.get("output") for chunk in stream.get("stream") or [] if isinstance(chunk, dict)
            )
        status = await self._client.status(key, endpoint, job)
        if status is None:
            raise ProviderError(Code.NOT_FOUND, RESULT_EXPIRED)
        state = str(status.get("status", ""))
        if state == "COMPLETED" and isinstance(status.get("output"), list):
            # The aggregate output (every yield) is authoritative: it fills any gap in the stream.
            followed.base, followed.chunks = 0, list(status["output"])
        start = max(delivered - followed.base, 0)
        new_chunks = followed.chunks[start:]
        events = [event for chunk in new_chunks if (event := _event(chunk)) is not None]
        cursor = str(followed.base + len(followed.chunks)) if new_chunks else str(delivered)

        if state == "IN_QUEUE":
            queued_s = max(float(status.get("delayTime") or 0) / 1000, time.monotonic() - followed.first_seen)
            if queued_s > self._settings.runpod_queue_timeout_s:
                reason = await self._stuck_reason(key, endpoint, queued_s)
                if reason:
                    await self._client.cancel(key, endpoint, job)
                    _remember(self._failures, job, reason)
                    return StatusReport("FAILED", events, cursor, error=reason)
            note = await self._queue_note(key, endpoint, followed, queued_s)
            return StatusReport("SUBMITTED", events, cursor, stage_message=note or WAITING_FOR_GPU)
        if state == "IN_PROGRESS":
            return StatusReport("RUNNING", events, cursor)
        if state == "COMPLETED":
            if not isinstance(status.get("output"), list):
                # The worker aggregates every yield: no output means its final upload failed.
                return StatusReport("FAILED", events, cursor, error=NO_OUTPUT, usage=_usage(status))
            chunks = followed.chunks if followed.base == 0 else []
            try:
                final_result(chunks)
            except ProviderError as exc:
                return StatusReport("FAILED", events, cursor, error=exc.message, usage=_usage(status))
            return StatusReport("COMPLETED", events, cursor, result_ready=True, usage=_usage(status))
        if state == "FAILED":
            error = error_text(status.get("error"))
            return StatusReport("FAILED", events, cursor, error=error, usage=_usage(status))
        if state == "TIMED_OUT":
            return StatusReport(
                "FAILED", events, cursor, error=self._timeout_message(job), usage=_usage(status)
            )
        if state == "CANCELLED":
            return StatusReport("CANCELLED", events, cursor, usage=_usage(status))
        return StatusReport("RUNNING", events, cursor)

    async def _worker_counts(self, key: str, endpoint: str) -> dict[str, int]:
        summary = await self._client.endpoint_workers(key, endpoint)
        return {name: _count(summary.get(name)) for name in _WORKER_COUNTS}

    async def _pools_tried(self, key: str, endpoint: str) -> str:
        found = await self._client.get_endpoint(key, endpoint)
        pools = _object(found.get("gpu")).get("pools") if found else None
        return ", ".join(str(pool) for pool in pools or []) or "unknown"

    async def _queue_note(self, key: str, endpoint: str, followed: _Followed, queued_s: float) -> str:
        """While a job waits past a cold start: RunPod's workers for it waiting for a GPU (throttled)
        said plainly, with the pools tried. RunPod is asked at most every
        RUNPOD_QUEUE_CHECK_INTERVAL_S (its REST API is rate limited); "" = still a cold start."""
        settings = self._settings
        if queued_s < settings.runpod_no_gpu_notice_s:
            return ""
        now = time.monotonic()
        if now - followed.looked_at < settings.runpod_queue_check_interval_s:
            return followed.queue_note
        followed.looked_at = now
        counts = await self._worker_counts(key, endpoint)
        followed.queue_note = ""
        if counts["throttled"] or counts["total"] == 0:
            limit_min = settings.runpod_queue_timeout_s / 60
            followed.queue_note = (
                f"No GPU free on RunPod in the pools tried ({await self._pools_tried(key, endpoint)}) for "
                f"{_waited(queued_s)}; RunPod keeps waiting for one (nothing is billed while it waits) and "
                f"the job is cancelled after {limit_min:g} min. You can {NO_GPU_ACTIONS}"
            )
        return followed.queue_note

    async def _stuck_reason(self, key: str, endpoint: str, queued_s: float) -> str:
        """Why a job stays queued, when RunPod itself will never say so; "" = keep waiting."""
        counts = await self._worker_counts(key, endpoint)
        if counts["unhealthy"] and not (counts["running"] or counts["idle"]):
            return (
                "RunPod's workers for this endpoint keep failing to start (unhealthy); the job was cancelled"
            )
        if counts["throttled"] or counts["total"] == 0:
            return no_gpu_message(await self._pools_tried(key, endpoint), queued_s)
        return ""

    def _timeout_message(self, provider_job_id: str) -> str:
        ceiling = self._settings.runpod_execution_timeout_s
        limit = int(self._timeouts.get(provider_job_id, ceiling))
        why = "" if limit == ceiling else f", set from its estimate; the endpoint allows up to {ceiling} s"
        return (
            f"The job exceeded its execution timeout ({limit} s{why}) and RunPod stopped it "
            "(or it expired before a worker picked it up); use fewer examples or epochs"
        )

    async def result(self, account: AccountRef, provider_job_id: str) -> bytes:
        endpoint = self._endpoint(account)
        key = await self._key(account)
        status = await self._client.status(key, endpoint, provider_job_id)
        if status is None:
            raise ProviderError(Code.NOT_FOUND, RESULT_EXPIRED)
        state = status.get("status")
        if state != "COMPLETED":
            raise ProviderError(Code.FAILED_PRECONDITION, f"The result is not ready (RunPod says {state})")
        output = status.get("output")
        return final_result(output if isinstance(output, list) else [])

    async def artifact(self, account: AccountRef, provider_job_id: str, name: str) -> Iterator[bytes]:
        """The bytes of file ``name`` of a COMPLETED job whose files came back inline, from
        RunPod's output (kept 30 minutes), part by part."""
        endpoint = self._endpoint(account)
        key = await self._key(account)
        status = await self._client.status(key, endpoint, provider_job_id)
        if status is None:
            raise ProviderError(Code.NOT_FOUND, RESULT_EXPIRED)
        if status.get("status") != "COMPLETED":
            raise ProviderError(
                Code.FAILED_PRECONDITION, f"The job has no files yet (RunPod says {status.get('status')})"
            )
        output = status.get("output")
        return artifact_data(output if isinstance(output, list) else [], name)

    async def cancel(self, account: AccountRef, provider_job_id: str) -> str:
        endpoint = self._endpoint(account)
        key = await self._key(account)
        answer = await self._client.cancel(key, endpoint, provider_job_id)
        if answer is None:
            raise ProviderError(Code.NOT_FOUND, "RunPod does not know this job (it may have expired)")
        self._followed.pop(provider_job_id, None)
        state = str(answer.get("status", "CANCELLED"))
        return {"COMPLETED": "COMPLETED", "FAILED": "FAILED", "TIMED_OUT": "FAILED"}.get(state, "CANCELLED")

    def estimate(
        self, spec_json: bytes, backend: str, kind: str = "", request_json: bytes = b""
    ) -> dict[str, Any]:
        spec = parse_spec(spec_json)
        # A researcher's endpoint has RUNPOD_WORKERS_MAX workers; the hosted tier's endpoint is
        # the operator's, whose workers this service is not told (the cost model's default).
        workers = self._settings.runpod_workers_max if backend in ("", "runpod") else None
        try:
            fields = costs.estimate(spec, backend or "runpod", kind, request_json, workers)
        except JobInputError as exc:
            raise ProviderError(Code.INVALID_ARGUMENT, str(exc)) from None
        band = self._settings.runpod_pool_price_band
        # The choice is for the researcher's own endpoint; the hosted tier's is the operator's.
        choice = (spec.runpod_gpu or "") if backend in ("", "runpod") else ""
        rates = costs.pool_rates(spec.model_id, spec.hyperparams.quantization, band, choice)
        if rates and rates[-1][1] > fields["usd_per_second"]:
            # The endpoint offers RunPod the fitting pools within the band (or all of them); it
            # bills whichever GPU it assigns.
            (top, top_rate), time_s = rates[-1], fields["estimated_time_s"]
            which = (
                "at any price"
                if choice == RUNPOD_ALL_FITTING
                else f"within {band:g}x the cheapest one's price"
            )
            fields["notes"] = [
                *fields["notes"],
                f"Billed at the GPU RunPod assigns among the {len(rates)} pools that fit {which}: "
                f"from ${fields['usd_per_second']:.6f}/s "
                f"({fields['gpu']}, priced here) to ${top_rate:.6f}/s ({top}), so "
                f"{usd(fields['estimated_cost_usd'])} to {usd(time_s * top_rate)} for this job (a faster GPU "
                "also takes less time). While a bigger model's job is still on your endpoint, this "
                "one runs on that job's pools.",
            ]
        elif choice and choice != RUNPOD_ALL_FITTING:
            fields["notes"] = [
                *fields["notes"],
                f"Runs on {choice}, the GPU pool you chose (the endpoint offers RunPod only that "
                "pool; if it has no GPU free, the job waits). While another of your jobs is still "
                "on your endpoint on other pools that fit, this one runs on those.",
            ]
        ceiling = self._settings.runpod_execution_timeout_s
        if fields["estimated_time_s"] > ceiling:
            # Shown before submitting: RunPod would stop the job at the endpoint's timeout.
            fields["notes"] = [
                *fields["notes"],
                f"Over the execution timeout: estimated {_span(fields['estimated_time_s'])}, but "
                f"RunPod stops any job of this endpoint after {_span(ceiling)} and the time run "
                "until then is billed. Use fewer examples, epochs or a shorter max sequence length.",
            ]
        return fields


def no_gpu_message(pools: str, queued_s: float) -> str:
    """The error of a job cancelled because RunPod had no GPU for it in its pools."""
    return (
        f"No GPU available on RunPod: none was free in the pools tried ({pools}) for {_waited(queued_s)}, "
        f"so the job was cancelled before it ran (nothing was billed). You can {NO_GPU_ACTIONS}."
    )


def _span(seconds: float) -> str:
    """A length of time in the unit that reads best: 90 s, 15 min, 2.5 h."""
    if seconds >= 3600:
        return f"{round(seconds / 3600, 1):g} h"
    if seconds >= 120:
        return f"{round(seconds / 60):g} min"
    return f"{seconds:.0f} s"


def _waited(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def parse_spec(spec_json: bytes) -> ExperimentSpec:
    # Size limits are the gateway's to enforce; a provider only checks the spec is well formed.
    try:
        return schemas.parse_spec(spec_json, schemas.NO_SIZE_LIMITS)
    except schemas.SpecError as exc:
        problems = "; ".join(exc.problems)
        raise ProviderError(Code.INVALID_ARGUMENT, f"Invalid experiment spec: {problems}") from None


def scores_npy_bytes(n_eval: int, n_train: int) -> int:
    """The size of scores.npy: float32 [n_eval, n_train] after numpy's 128-byte header."""
    return 128 + 4 * n_eval * n_train


def worker_input(
    spec: ExperimentSpec, kind: str, request_json: bytes, parent_result_json: bytes
) -> dict[str, Any]:
    """The job's RunPod input (gpu_core.jobs payload), checked the way the worker reads it."""
    try:
        request = json.loads(request_json) if request_json else None
        parent = json.loads(parent_result_json) if parent_result_json else None
        payload = make_payload(kind, spec.model_dump(mode="json"), request, parent)
        parse_payload(payload)
    except (JobInputError, schemas.SpecError, ValueError) as exc:
        raise ProviderError(Code.INVALID_ARGUMENT, f"Invalid job input: {exc}") from None
    return payload


def parse_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    if not cursor.isdigit():
        raise ProviderError(Code.INVALID_ARGUMENT, f"cursor {cursor!r} was not issued by compute-runpod")
    return int(cursor)


def _event(chunk: Any) -> dict[str, Any] | None:
    """A chunk the researcher should see as an event (results and errors travel elsewhere)."""
    if not isinstance(chunk, dict) or is_result_chunk(chunk) or is_artifact_chunk(chunk) or "error" in chunk:
        return None
    return chunk


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    """A non-negative count from RunPod's JSON (absent or malformed: 0)."""
    try:
        return max(int(value or 0), 0)
    except (TypeError, ValueError):
        return 0


def _remember(table: OrderedDict[str, str], key: str, value: str) -> None:
    table[key] = value
    while len(table) > _REMEMBERED_JOBS:
        table.popitem(last=False)

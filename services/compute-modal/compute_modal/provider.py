"""compute-modal's logic, free of gRPC: submit, status, result, cancel and estimate over a
``ModalAdapter``, with Modal's outcomes translated into job states and plain-words errors.

Progress Dict keys: ``<job_id>`` is the worker's progress entry (see worker/modal_app.py),
``<job_id>#call`` the FunctionCall id of a submitted job (a resubmit returns it instead of spawning
again), ``<job_id>#cancelled`` marks a cancel requested here, ``<job_id>#claim`` the call that
runs the job (written by the function before any GPU work).

Submit is idempotent on the job id without a lock of ours: ``#call`` is first taken with Modal's
put-if-absent (``put(..., skip_if_exists=True)``) holding a "spawning" mark, and only the submit
that took it spawns. Another submit of the same job finds the call id (and returns it), or the
mark: it then adopts the call that claimed the job, answers UNAVAILABLE while the spawn may still
be in flight, and spawns again only once the mark is older than ``SPAWN_STALE_S`` with no call
claiming the job; should the first spawn have happened after all, its function finds the claim
taken and returns a "Duplicate delivery" error without GPU work. Once a finished job's last events
have been handed out, its entry and cancel mark are removed.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import modal.exception

import cost_model
from compute_modal.adapter import ModalAdapter, ModalNotConfigured
from cost_model.estimate import DEFAULT_MODAL_MAX_CONTAINERS
from gpu_core.hf_token import HF_TOKEN_FIELD
from gpu_core.jobs import WRITES_ARTIFACTS, JobInputError, make_payload, parse_payload
from gpu_core.schemas import NO_SIZE_LIMITS, ExperimentSpec, SpecError, parse_spec

log = logging.getLogger(__name__)

WAITING_FOR_GPU = "waiting for a Modal GPU container (cold start usually 20-60 s)"
_CALL_SUFFIX = "#call"
_CLAIM_SUFFIX = "#claim"  # worker/modal_app.py CLAIM_SUFFIX
_SPAWNING = "spawning since "
# A "spawning" mark older than this, with no call claiming the job, is a submit that died.
SPAWN_STALE_S = 600.0
_CANCEL_SUFFIX = "#cancelled"


# Same shape class after class: each error names its own gRPC status code; a table or factory
# would hide the names the servicer and the tests catch by.
class ProviderError(Exception):
    """An error for the caller; ``code`` is the gRPC status code name."""

    code = "INTERNAL"


class InvalidRequest(ProviderError):
    code = "INVALID_ARGUMENT"


class NotConfigured(ProviderError):
    code = "FAILED_PRECONDITION"


class InvalidCredentials(ProviderError):
    code = "UNAUTHENTICATED"


class ResultNotReady(ProviderError):
    code = "FAILED_PRECONDITION"


class ResultGone(ProviderError):
    code = "NOT_FOUND"


class Unreachable(ProviderError):
    code = "UNAVAILABLE"


class State(Enum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class ProgressItem:
    seq: int
    time: float
    event: dict[str, Any]


@dataclass(frozen=True)
class Usage:
    """The wall time of the function's body (worker/modal_app.py measures it; the container
    holds its GPU for all of it), in seconds."""

    gpu_seconds: float
    source: str


def _usage(outcome: Any) -> Usage | None:
    usage = outcome.get("usage") if isinstance(outcome, dict) else None
    if not isinstance(usage, dict) or not isinstance(usage.get("gpu_seconds"), int | float):
        return None  # a function deployed before it reported usage, or one that raised
    return Usage(
        max(float(usage["gpu_seconds"]), 0.0), str(usage.get("source") or "Modal function wall time")
    )


@dataclass(frozen=True)
class JobStatus:
    state: State
    events: list[ProgressItem] = field(default_factory=list)
    cursor: int = 0
    error: str = ""
    stage_message: str = ""
    usage: Usage | None = None  # once the call has returned: the function's own timing

    @property
    def result_ready(self) -> bool:
        return self.state is State.COMPLETED


@dataclass(frozen=True)
class Verification:
    valid: bool
    message: str


class ModalProvider:
    def __init__(
        self,
        adapter: ModalAdapter,
        app_name: str,
        function_name: str,
        environment: str,
        reveal_hf_token: Callable[[str], Awaitable[str]] | None = None,
        max_containers: int = DEFAULT_MODAL_MAX_CONTAINERS,
    ) -> None:
        self._adapter = adapter
        self._max_containers = max_containers
        self._target = f"{app_name}.{function_name} in Modal environment {environment!r}"
        # The researcher's own Hugging Face token ("" when none); None: keyvault not configured.
        self._reveal_hf_token = reveal_hf_token

    @contextmanager
    def _modal_errors(self) -> Iterator[None]:
        """Translate failures of talking to Modal (not of the job) into provider errors."""
        try:
            yield
        except ModalNotConfigured as exc:
            raise NotConfigured(str(exc)) from None
        except modal.exception.AuthError:
            raise InvalidCredentials(
                "Modal rejected the operator's token (MODAL_TOKEN_ID / MODAL_TOKEN_SECRET)"
            ) from None
        except modal.exception.NotFoundError:
            raise NotConfigured(
                f"the Modal app is not deployed: {self._target} was not found; run `make modal-deploy`"
            ) from None
        except (modal.exception.ConnectionError, ConnectionError) as exc:
            raise Unreachable(f"Modal cannot be reached: {exc}") from None

    async def check(self) -> None:
        """Raise a ProviderError unless the token works and the app is deployed."""
        with self._modal_errors():
            await self._adapter.check()

    async def verify(self, api_key: str) -> Verification:
        if api_key:
            return Verification(
                False, "the hosted tier runs on the operator's Modal account; it takes no key"
            )
        try:
            await self.check()
        except (NotConfigured, InvalidCredentials) as exc:
            return Verification(False, str(exc))
        return Verification(True, f"Modal is ready: {self._target} is deployed")

    # Same parameter list as compute-local's LocalRunner.submit and compute-runpod's provider: each
    # takes the SubmitRequest fields it uses, in proto order; the backends differ past the list.
    async def submit(
        self,
        job_id: str,
        spec_json: bytes,
        kind: str = "",
        request_json: bytes = b"",
        parent_result_json: bytes = b"",
        upload_urls: dict[str, str] | None = None,
        parent_artifacts: list[dict[str, Any]] | None = None,
        user_id: str = "",
        datasets: list[dict[str, Any]] | None = None,
    ) -> str:
        """``kind``: a later job of the experiment ``spec_json`` (gpu_core.jobs), e.g. a
        counterfactual check; the function receives the gpu_core.jobs payload. ``upload_urls``:
        the scheduler's presigned PUT URL per artifact name of an experiment; the function uploads
        the run's files there (worker/modal_app.py). None: the run keeps no files.
        ``parent_artifacts``: presigned GETs of the experiment's files a follow-up query reads.
        ``user_id``: whose Hugging Face token (if they saved one) the function loads models with.
        ``datasets``: presigned GETs of the stored datasets the spec names (gpu_core.datasets)."""
        if not job_id:
            raise InvalidRequest("job_id is empty")
        spec = _read_spec(spec_json)
        try:
            request = json.loads(request_json) if request_json else None
            parent = json.loads(parent_result_json) if parent_result_json else None
            payload = make_payload(kind, spec.model_dump(mode="json"), request, parent)
            parse_payload(payload)
        except (JobInputError, SpecError, ValueError) as exc:
            raise InvalidRequest(f"invalid job input: {exc}") from None
        # The job runs on the GPU its estimate priced (the operator's MODAL_GPU, when set).
        gpu = self.estimate(spec_json, "hosted", kind, request_json).gpu
        with self._modal_errors():
            existing = await self._take_spawn(job_id)
            if existing:
                return existing
            # The kinds that write files (an experiment, a merge, a sharded experiment's parts)
            # upload them to the scheduler's URLs.
            if upload_urls and kind in ("", *WRITES_ARTIFACTS):
                payload["artifact_transport"] = {"mode": "presigned", "urls": upload_urls}
            if parent_artifacts:
                payload["parent_artifacts"] = parent_artifacts
            if datasets:
                payload["datasets"] = datasets
            if self._reveal_hf_token is not None and user_id:
                hf_token = await self._reveal_hf_token(user_id)
                if hf_token:
                    payload[HF_TOKEN_FIELD] = hf_token
            call_id = await self._adapter.spawn(job_id, payload, gpu)
            await self._adapter.write_progress(job_id + _CALL_SUFFIX, call_id)
        log.info("submitted", extra={"job_id": job_id, "provider_job_id": call_id, "gpu": gpu})
        return call_id

    async def _take_spawn(self, job_id: str) -> str:
        """Take the right to spawn ``job_id`` (returns ""), or the FunctionCall id that a
        submit before this one started."""
        key = job_id + _CALL_SUFFIX
        if await self._adapter.put_progress_if_absent(key, f"{_SPAWNING}{time.time()}"):
            return ""
        existing = str(await self._adapter.read_progress(key) or "")
        if not existing.startswith(_SPAWNING):
            return existing
        claimed = await self._adapter.read_progress(job_id + _CLAIM_SUFFIX)
        if claimed:
            await self._adapter.write_progress(key, str(claimed))
            return str(claimed)
        since = float(existing.removeprefix(_SPAWNING) or 0)
        if time.time() - since < SPAWN_STALE_S:
            raise Unreachable(
                f"job {job_id} is being submitted to Modal by another request; its call id is not "
                "known yet, so it was not spawned again"
            )
        await self._adapter.write_progress(key, f"{_SPAWNING}{time.time()}")
        return ""

    async def status(self, call_id: str, job_id: str, cursor: str) -> JobStatus:
        after = _parse_cursor(cursor)
        if not call_id or not job_id:
            raise InvalidRequest("provider_job_id and job_id are both required")
        with self._modal_errors():
            cancelled = bool(await self._adapter.read_progress(job_id + _CANCEL_SUFFIX))
            # Poll before reading progress: once the call has ended, the entry read next is complete.
            state, error, usage = await self._poll(call_id, cancelled)
            entry = await self._adapter.read_progress(job_id) or {}
        if cancelled and state is not State.COMPLETED:
            state, error = State.CANCELLED, ""
        items = [
            ProgressItem(int(item["seq"]), float(item["time"]), dict(item["event"]))
            for item in entry.get("events", [])
            if int(item["seq"]) > after
        ]
        new_cursor = max(after, int(entry.get("seq", 0)))
        stage_message = ""
        if state is State.RUNNING and not entry:
            state, stage_message = State.SUBMITTED, WAITING_FOR_GPU
        if state in (State.COMPLETED, State.FAILED, State.CANCELLED):
            await self._forget(job_id)
        return JobStatus(state, items, new_cursor, error, stage_message, usage)

    async def _poll(self, call_id: str, cancelled: bool) -> tuple[State, str, Usage | None]:
        try:
            outcome = await self._adapter.get(call_id)
        except TimeoutError:  # the builtin: still queued or running
            return State.RUNNING, "", None
        except modal.exception.OutputExpiredError:
            if cancelled:  # cancelled before it started: no output and no unfinished input
                return State.CANCELLED, "", None
            raise ResultGone(_gone(call_id)) from None
        except (
            ModalNotConfigured,
            modal.exception.AuthError,
            modal.exception.ConnectionError,
            ConnectionError,
        ):
            raise
        except modal.exception.RemoteError as exc:
            return State.FAILED, f"Modal terminated the job: {exc}", None
        except Exception as exc:  # an exception re-raised by Modal
            return State.FAILED, _failure(exc), None
        if _outcome_error(outcome):
            return State.FAILED, _outcome_error(outcome), _usage(outcome)
        return State.COMPLETED, "", _usage(outcome)

    async def _forget(self, job_id: str) -> None:
        with self._modal_errors():
            await self._adapter.delete_progress(job_id)
            await self._adapter.delete_progress(job_id + _CANCEL_SUFFIX)

    async def result(self, call_id: str) -> bytes:
        with self._modal_errors():
            try:
                value = await self._adapter.get(call_id)
            except TimeoutError:
                raise ResultNotReady("the job is still running; its result is not ready") from None
            except modal.exception.OutputExpiredError:
                raise ResultGone(_gone(call_id)) from None
            except (
                ModalNotConfigured,
                modal.exception.AuthError,
                modal.exception.ConnectionError,
                ConnectionError,
            ):
                raise
            except modal.exception.RemoteError as exc:
                raise ResultNotReady(f"the job has no result: Modal terminated it ({exc})") from None
            except Exception as exc:  # an exception re-raised by Modal
                raise ResultNotReady(f"the job has no result: {_failure(exc)}") from None
        if _outcome_error(value):
            raise ResultNotReady(f"the job has no result: {_outcome_error(value)}")
        if not isinstance(value, dict) or not isinstance(value.get("result"), dict):
            raise ResultNotReady("the Modal function returned no result (is the deployed app current?)")
        return json.dumps(value["result"]).encode()

    async def cancel(self, call_id: str, job_id: str) -> State:
        if not call_id:
            raise InvalidRequest("provider_job_id is empty")
        with self._modal_errors():
            if job_id:
                await self._adapter.write_progress(job_id + _CANCEL_SUFFIX, True)
            await self._adapter.cancel(call_id)
        log.info("cancelled", extra={"job_id": job_id, "provider_job_id": call_id})
        return State.CANCELLED

    def estimate(
        self, spec_json: bytes, backend: str, kind: str = "", request_json: bytes = b""
    ) -> cost_model.CostEstimate:
        spec = _read_spec(spec_json)
        try:
            return cost_model.estimate_job(
                spec, "modal", backend or "hosted", kind, request_json, parallel_jobs=self._max_containers
            )
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None


def _read_spec(spec_json: bytes) -> ExperimentSpec:
    # Size limits are the gateway's to enforce; a provider only checks the spec is well formed.
    # SpecError names each field and rule, never the input's values.
    try:
        return parse_spec(spec_json, NO_SIZE_LIMITS)
    except SpecError as exc:
        raise InvalidRequest(f"spec_json is not a valid experiment spec: {'; '.join(exc.problems)}") from None


def _parse_cursor(cursor: str) -> int:
    if not cursor:
        return 0
    if not cursor.isdigit():
        raise InvalidRequest(f"cursor {cursor!r} is not one this service issued")
    return int(cursor)


def _outcome_error(outcome: Any) -> str:
    """The plain message of a failed run (worker/modal_app.py returns failures, not raises)."""
    if isinstance(outcome, dict) and isinstance(outcome.get("error"), str):
        return outcome["error"] or "the experiment failed without a message"
    return ""


def _gone(call_id: str) -> str:
    return (
        f"Modal no longer has job {call_id}: results are kept 7 days after the job ends "
        "(or the id is unknown)"
    )


def _failure(exc: BaseException) -> str:
    if isinstance(exc, modal.exception.FunctionTimeoutError):
        return "the job ran past the Modal function's time limit"
    if isinstance(exc, modal.exception.InternalFailure):
        return f"Modal had an internal failure: {exc}"
    return f"{type(exc).__name__}: {exc}"

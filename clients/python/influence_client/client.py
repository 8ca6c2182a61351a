"""Sync and async clients of the Influence Dashboard REST API.

Each call is described once (``_Call``: method, path, body, how to read the answer) and run by
either client, so the two cannot drift. The experiment spec and result travel as JSON objects
(gpu_core's schema); everything else is parsed into ``influence_client.models``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from influence_client import models

DEFAULT_API = "http://127.0.0.1:8080"
API_ENV = "INFLUENCE_API"
TOKEN_ENV = "INFLUENCE_TOKEN"
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# A dropped event stream is resumed from the last seq this many times in a row before giving up.
MAX_STREAM_RECONNECTS = 5
RECONNECT_DELAY_S = 1.0
_CHUNK_BYTES = 1 << 20

T = TypeVar("T")


class InfluenceError(Exception):
    """An error answer of the gateway: its status and ``detail`` (a sentence, or one
    :class:`~influence_client.models.FieldProblem` per problem of an invalid spec)."""

    def __init__(
        self,
        status: int,
        detail: str | list[models.FieldProblem],
        method: str,
        path: str,
        retry_after_s: float | None = None,
    ) -> None:
        self.status = status
        self.detail = detail
        # From Retry-After (a 429 over a usage limit, a 503 while a service restarts).
        self.retry_after_s = retry_after_s
        if isinstance(detail, list):
            text = "; ".join(f"{problem.field}: {problem.message}" for problem in detail)
        else:
            text = detail
        super().__init__(f"{method} {path} answered {status}: {text}")


def default_api() -> str:
    return os.environ.get(API_ENV) or DEFAULT_API


def load_spec(spec: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A spec given as an object, or as the path of a JSON file."""
    if isinstance(spec, dict):
        return spec
    return json.loads(Path(spec).read_text(encoding="utf-8"))


def _error(reply: httpx.Response) -> InfluenceError:
    try:
        detail = models.ErrorResponse.model_validate(reply.json()).detail
    except ValueError:
        detail = reply.text.strip() or reply.reason_phrase
    retry_after = reply.headers.get("retry-after", "")
    return InfluenceError(
        reply.status_code,
        detail,
        reply.request.method,
        reply.request.url.path,
        float(retry_after) if retry_after.strip().isdigit() else None,
    )


def _model(model: type[BaseModel]) -> Callable[[httpx.Response], Any]:
    return lambda reply: model.model_validate(reply.json())


def _json(reply: httpx.Response) -> dict[str, Any]:
    return reply.json()


@dataclass(frozen=True)
class _Call(Generic[T]):
    method: str
    path: str
    read: Callable[[httpx.Response], T]
    json: Any = None
    params: dict[str, Any] | None = None
    content: Any = None  # a streamed body (a dataset's chunks), instead of ``json``
    headers: dict[str, str] = field(default_factory=dict)
    authenticated: bool = True


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK_BYTES):
            yield block


async def _async_file_chunks(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while block := await asyncio.to_thread(handle.read, _CHUNK_BYTES):
            yield block


def _job_path(job_id: str, tail: str = "") -> str:
    return f"/api/jobs/{quote(job_id, safe='')}{tail}"


def _later_job(
    job_id: str,
    path: str,
    model: type[BaseModel],
    request: dict[str, Any] | None,
    idempotency_key: str | None,
) -> _Call[Any]:
    """Submit a later job of an experiment (a check, query, curation, or an experiment from a
    curation): one POST per key."""
    return _Call(
        "POST",
        _job_path(job_id, path),
        _model(model),
        json=request,
        headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex},
    )


def _artifact_path(job_id: str, name: str) -> str:
    return _job_path(job_id, "/artifacts/" + quote(_safe_artifact_name(name), safe="/"))


def _safe_artifact_name(name: str) -> str:
    """An artifact name as a relative POSIX path that stays inside the download directory."""
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\\" in name:
        raise ValueError(f"artifact name {name!r} is not a relative path inside the job's artifacts")
    return str(path)


def _store_redirect(reply: httpx.Response) -> tuple[str, dict[str, str]]:
    """The gateway may answer a download with a short-lived URL of the artifact store: it is
    signed by itself, and the bearer token must not travel to another host."""
    return reply.headers["location"], {}


class _Calls:
    """Every call of the API, described once."""

    @staticmethod
    def sign_in(username: str) -> _Call[models.AccessToken]:
        return _Call(
            "POST",
            "/api/auth/local",
            _model(models.AccessToken),
            json={"username": username},
            authenticated=False,
        )

    @staticmethod
    def config() -> _Call[models.GatewayConfig]:
        return _Call("GET", "/api/config", _model(models.GatewayConfig), authenticated=False)

    @staticmethod
    def model_list() -> _Call[list[models.ModelInfo]]:
        return _Call("GET", "/api/models", lambda r: models.ModelList.model_validate(r.json()).models)

    @staticmethod
    def submit(
        spec: dict[str, Any], idempotency_key: str | None, max_cost_usd: float | None = None
    ) -> _Call[models.SubmittedJob]:
        return _Call(
            "POST",
            "/api/train",
            _model(models.SubmittedJob),
            json=spec,
            params={"max_cost_usd": max_cost_usd} if max_cost_usd else None,
            headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex},
        )

    @staticmethod
    def datasets(sha256: str | None = None) -> _Call[list[models.Dataset]]:
        return _Call(
            "GET",
            "/api/datasets",
            lambda r: models.DatasetList.model_validate(r.json()).datasets,
            params={"sha256": sha256} if sha256 else None,
        )

    @staticmethod
    def upload_dataset(kind: str, filename: str, content: Any) -> _Call[models.Dataset]:
        return _Call(
            "POST",
            "/api/datasets",
            _model(models.Dataset),
            params={"kind": kind, "filename": filename},
            content=content,
        )

    @staticmethod
    def estimate(spec: dict[str, Any]) -> _Call[models.EstimateAnswer]:
        return _Call("POST", "/api/estimate", _model(models.EstimateAnswer), json=spec)

    @staticmethod
    def jobs(limit: int, filters: dict[str, str | None]) -> _Call[list[models.Job]]:
        given = {name: value for name, value in filters.items() if value}
        return _Call(
            "GET",
            "/api/jobs",
            lambda r: models.JobList.model_validate(r.json()).jobs,
            params={"limit": limit, **given},
        )

    @staticmethod
    def update_labels(job_id: str, labels: dict[str, Any]) -> _Call[models.Job]:
        return _Call("PATCH", _job_path(job_id), _model(models.Job), json=labels)

    @staticmethod
    def compare(job_ids: list[str]) -> _Call[models.Comparison]:
        return _Call("GET", "/api/compare", _model(models.Comparison), params={"ids": ",".join(job_ids)})

    @staticmethod
    def job(job_id: str) -> _Call[models.Job]:
        return _Call("GET", _job_path(job_id), _model(models.Job))

    @staticmethod
    def results(job_id: str) -> _Call[dict[str, Any]]:
        return _Call("GET", _job_path(job_id, "/results"), _json)

    @staticmethod
    def spec(job_id: str) -> _Call[dict[str, Any]]:
        return _Call("GET", _job_path(job_id, "/spec"), _json)

    @staticmethod
    def artifacts(job_id: str) -> _Call[list[models.Artifact]]:
        return _Call(
            "GET",
            _job_path(job_id, "/artifacts"),
            lambda r: models.ArtifactList.model_validate(r.json()).artifacts,
        )

    @staticmethod
    def cancel(job_id: str) -> _Call[models.Job]:
        return _Call("POST", _job_path(job_id, "/cancel"), _model(models.Job))

    @staticmethod
    def delete(job_id: str) -> _Call[models.JobDeleted]:
        return _Call("DELETE", _job_path(job_id), _model(models.JobDeleted))

    @staticmethod
    def counterfactual_estimate(job_id: str, request: dict[str, Any]) -> _Call[models.CounterfactualEstimate]:
        return _Call(
            "POST",
            _job_path(job_id, "/counterfactual/estimate"),
            _model(models.CounterfactualEstimate),
            json=request,
        )

    @staticmethod
    def submit_counterfactual(
        job_id: str, request: dict[str, Any], idempotency_key: str | None
    ) -> _Call[models.CounterfactualSubmitted]:
        return _later_job(job_id, "/counterfactual", models.CounterfactualSubmitted, request, idempotency_key)

    @staticmethod
    def merge_estimate(job_id: str, request: dict[str, Any]) -> _Call[models.MergeEstimate]:
        return _Call(
            "POST", _job_path(job_id, "/merges/estimate"), _model(models.MergeEstimate), json=request
        )

    @staticmethod
    def submit_merge(
        job_id: str, request: dict[str, Any], idempotency_key: str | None
    ) -> _Call[models.MergeSubmitted]:
        return _later_job(job_id, "/merges", models.MergeSubmitted, request, idempotency_key)

    @staticmethod
    def merges(job_id: str) -> _Call[list[models.MergeJob]]:
        return _Call(
            "GET", _job_path(job_id, "/merges"), lambda r: models.MergeList.model_validate(r.json()).merges
        )

    @staticmethod
    def merge(job_id: str, merge_job_id: str) -> _Call[models.MergeJob]:
        return _Call(
            "GET", _job_path(job_id, f"/merges/{quote(merge_job_id, safe='')}"), _model(models.MergeJob)
        )

    @staticmethod
    def counterfactuals(job_id: str) -> _Call[list[models.CounterfactualCheck]]:
        return _Call(
            "GET",
            _job_path(job_id, "/counterfactual"),
            lambda r: models.CounterfactualList.model_validate(r.json()).counterfactual_jobs,
        )

    @staticmethod
    def counterfactual(job_id: str, check_id: str) -> _Call[models.CounterfactualCheck]:
        return _Call(
            "GET",
            _job_path(job_id, f"/counterfactual/{quote(check_id, safe='')}"),
            _model(models.CounterfactualCheck),
        )

    @staticmethod
    def submit_query(
        job_id: str, request: dict[str, Any], idempotency_key: str | None
    ) -> _Call[models.QuerySubmitted]:
        return _later_job(job_id, "/queries", models.QuerySubmitted, request, idempotency_key)

    @staticmethod
    def queries(job_id: str) -> _Call[list[models.QueryJob]]:
        return _Call(
            "GET", _job_path(job_id, "/queries"), lambda r: models.QueryList.model_validate(r.json()).queries
        )

    @staticmethod
    def query(job_id: str, query_job_id: str) -> _Call[models.QueryJob]:
        return _Call(
            "GET", _job_path(job_id, f"/queries/{quote(query_job_id, safe='')}"), _model(models.QueryJob)
        )

    @staticmethod
    def training_examples(job_id: str, sort: str, limit: int, offset: int) -> _Call[models.TrainingExamples]:
        return _Call(
            "GET",
            _job_path(job_id, "/training-examples"),
            _model(models.TrainingExamples),
            params={"sort": sort, "limit": limit, "offset": offset},
        )

    @staticmethod
    def curation_estimate(job_id: str, request: dict[str, Any]) -> _Call[models.CurationEstimate]:
        return _Call(
            "POST", _job_path(job_id, "/curations/estimate"), _model(models.CurationEstimate), json=request
        )

    @staticmethod
    def submit_curation(
        job_id: str, request: dict[str, Any], idempotency_key: str | None
    ) -> _Call[models.CurationSubmitted]:
        return _later_job(job_id, "/curations", models.CurationSubmitted, request, idempotency_key)

    @staticmethod
    def curations(job_id: str) -> _Call[list[models.Curation]]:
        return _Call(
            "GET",
            _job_path(job_id, "/curations"),
            lambda r: models.CurationList.model_validate(r.json()).curations,
        )

    @staticmethod
    def curated_training_set(job_id: str, curation_id: str) -> _Call[list[models.CuratedExample]]:
        return _Call(
            "GET",
            _job_path(job_id, f"/curations/{quote(curation_id, safe='')}/training-set.jsonl"),
            lambda r: [
                models.CuratedExample.model_validate_json(line) for line in r.text.splitlines() if line
            ],
        )

    @staticmethod
    def curation(job_id: str, curation_id: str) -> _Call[models.Curation]:
        return _Call(
            "GET", _job_path(job_id, f"/curations/{quote(curation_id, safe='')}"), _model(models.Curation)
        )

    @staticmethod
    def experiment_from_curation(
        job_id: str, curation_id: str, idempotency_key: str | None
    ) -> _Call[models.SubmittedJob]:
        return _later_job(
            job_id,
            f"/curations/{quote(curation_id, safe='')}/experiment",
            models.SubmittedJob,
            None,
            idempotency_key,
        )

    @staticmethod
    def compute_settings() -> _Call[models.ComputeSettings]:
        return _Call("GET", "/api/settings/compute", _model(models.ComputeSettings))

    @staticmethod
    def set_backend(backend: str) -> _Call[models.ComputeSettings]:
        return _Call(
            "PUT", "/api/settings/compute", _model(models.ComputeSettings), json={"backend": backend}
        )

    @staticmethod
    def runpod_key() -> _Call[models.RunpodKeyStatus]:
        return _Call("GET", "/api/settings/runpod-key", _model(models.RunpodKeyStatus))

    @staticmethod
    def save_runpod_key(api_key: str) -> _Call[models.RunpodKeySaved]:
        return _Call(
            "POST", "/api/settings/runpod-key", _model(models.RunpodKeySaved), json={"api_key": api_key}
        )

    @staticmethod
    def delete_runpod_key() -> _Call[models.RunpodKeyDeleted]:
        return _Call("DELETE", "/api/settings/runpod-key", _model(models.RunpodKeyDeleted))

    @staticmethod
    def runpod_endpoint() -> _Call[models.RunpodEndpoint]:
        return _Call("GET", "/api/settings/runpod-endpoint", _model(models.RunpodEndpoint))

    @staticmethod
    def delete_runpod_endpoint() -> _Call[models.RunpodEndpoint]:
        return _Call("DELETE", "/api/settings/runpod-endpoint", _model(models.RunpodEndpoint))


class SseParser:
    """Server-Sent Events, line by line: ``feed`` answers ``(event, data)`` at each blank line
    that ends an event with data; comments (heartbeats) and ``retry:`` lines give nothing."""

    def __init__(self) -> None:
        self.event = "message"
        self.data: list[str] = []

    def feed(self, line: str) -> tuple[str, dict[str, Any]] | None:
        if line == "":
            event, data = self.event, self.data
            self.event, self.data = "message", []
            return (event, json.loads("\n".join(data))) if data else None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self.event = value
        elif name == "data":
            self.data.append(value)
        return None


class _Stream:
    """What following one job's events needs on both clients: the resume point, the request
    and what each parsed event means."""

    def __init__(self, job_id: str, after: int) -> None:
        self.job_id = job_id
        self.last_seq = after
        self.ended = False
        self.failures = 0

    def request_args(self) -> dict[str, Any]:
        return {"params": {"after": self.last_seq}, "headers": {"Last-Event-ID": str(self.last_seq)}}

    def take(self, event: str, data: dict[str, Any]) -> models.JobEvent | None:
        """The event to yield, if any; marks the stream ended on ``end``."""
        if event == "end":
            self.ended = True
            return None
        if event == "error":
            # The gateway lost the scheduler; reconnecting resumes after last_seq.
            raise httpx.RemoteProtocolError(data.get("message", "the event stream broke"))
        parsed = models.JobEvent.model_validate(data)
        self.last_seq = max(self.last_seq, parsed.seq)
        self.failures = 0
        return parsed

    def broke(self, exc: Exception) -> None:
        self.failures += 1
        if self.failures > MAX_STREAM_RECONNECTS:
            raise exc


_STREAM_ERRORS = (httpx.TransportError,)


class _Base:
    def __init__(self, api: str | None, token: str | None, timeout_s: float, follow_timeout_s: float) -> None:
        self.api = (api or default_api()).rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout_s = timeout_s
        self.follow_timeout = httpx.Timeout(follow_timeout_s, connect=10.0)

    def _headers(self, call_headers: dict[str, str], authenticated: bool = True) -> dict[str, str]:
        headers = dict(call_headers)
        if authenticated and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


class Client(_Base):
    """The synchronous client. ``api`` defaults to $INFLUENCE_API or the local stack, ``token``
    to $INFLUENCE_TOKEN; :meth:`sign_in` gets one from a stack in local sign-in mode.

    ``follow_timeout_s`` bounds the wait for the next event (the gateway sends a heartbeat
    every 15 s by default), not the whole run."""

    def __init__(
        self,
        api: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
        follow_timeout_s: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(api, token, timeout_s, follow_timeout_s)
        self.http = httpx.Client(base_url=self.api, timeout=timeout_s, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _run(self, call: _Call[T]) -> T:
        reply = self.http.request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            content=call.content,
            headers=self._headers(call.headers, call.authenticated),
        )
        if reply.is_error:
            raise _error(reply)
        return call.read(reply)

    def sign_in(self, username: str) -> models.AccessToken:
        """Local sign-in (AUTH_MODE=local): no password; the token is kept for later calls."""
        token = self._run(_Calls.sign_in(username))
        self.token = token.access_token
        return token

    def config(self) -> models.GatewayConfig:
        return self._run(_Calls.config())

    def submit(
        self,
        spec: dict[str, Any] | str | os.PathLike[str],
        idempotency_key: str | None = None,
        max_cost_usd: float | None = None,
    ) -> models.SubmittedJob:
        """Submit an experiment (an object or a JSON file). The same ``idempotency_key`` again
        answers the job it created the first time; without one each call makes a new job.
        ``max_cost_usd``: a spend cap; an estimate over it is refused, a job reaching it cancelled."""
        return self._run(_Calls.submit(load_spec(spec), idempotency_key, max_cost_usd))

    def estimate(self, spec: dict[str, Any] | str | os.PathLike[str]) -> models.EstimateAnswer:
        return self._run(_Calls.estimate(load_spec(spec)))

    def datasets(self, sha256: str | None = None) -> list[models.Dataset]:
        """Your stored datasets, newest first (only the one with these bytes, given ``sha256``)."""
        return self._run(_Calls.datasets(sha256))

    def upload_dataset(self, path: str | os.PathLike[str], kind: str = "train") -> models.Dataset:
        """Store a training or eval file (streamed from disk) for specs to name by id
        (``training_dataset_id`` / ``eval_dataset_id``). A file already stored (same bytes and
        kind) is answered without sending it again, so after a failed upload calling this again
        is the retry."""
        path = Path(path)
        for found in self.datasets(_file_sha256(path)):
            if found.kind == kind:
                return found.model_copy(update={"existing": True})
        return self._run(_Calls.upload_dataset(kind, path.name, _file_chunks(path)))

    def jobs(
        self,
        limit: int = 50,
        tag: str | None = None,
        model: str | None = None,
        method: str | None = None,
        status: str | None = None,
    ) -> list[models.Job]:
        """Experiments, newest first; each filter given narrows the list."""
        filters = {"tag": tag, "model": model, "method": method, "status": status}
        return self._run(_Calls.jobs(limit, filters))

    def update_labels(self, job_id: str, **labels: Any) -> models.Job:
        """Change an experiment's ``name``, ``tags`` or ``note`` (None clears one)."""
        return self._run(_Calls.update_labels(job_id, labels))

    def compare(self, *job_ids: str) -> models.Comparison:
        """2 to 4 experiments side by side (config diff, metrics, loss curves, answers, agreement)."""
        return self._run(_Calls.compare(list(job_ids)))

    def job(self, job_id: str) -> models.Job:
        return self._run(_Calls.job(job_id))

    def results(self, job_id: str) -> dict[str, Any]:
        """gpu_core's result JSON: eval_results, influence, training, timings, environment."""
        return self._run(_Calls.results(job_id))

    def spec(self, job_id: str) -> dict[str, Any]:
        return self._run(_Calls.spec(job_id))

    def cancel(self, job_id: str) -> models.Job:
        return self._run(_Calls.cancel(job_id))

    def delete(self, job_id: str) -> models.JobDeleted:
        """Delete the job (cancelled first if running) and its artifacts."""
        return self._run(_Calls.delete(job_id))

    def artifacts(self, job_id: str) -> list[models.Artifact]:
        return self._run(_Calls.artifacts(job_id))

    def download_artifact(
        self, job_id: str, artifact: models.Artifact, directory: str | os.PathLike[str]
    ) -> Path:
        """Stream one artifact to ``directory/<name>``; its size and sha256 are checked."""
        target = Path(directory) / _safe_artifact_name(artifact.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _ArtifactFile(target, artifact) as sink:
            for chunk in self._artifact_chunks(job_id, artifact.name):
                sink.write(chunk)
        return target

    def _artifact_chunks(self, job_id: str, name: str) -> Iterator[bytes]:
        url, headers = _artifact_path(job_id, name), self._headers({})
        while True:
            with self.http.stream("GET", url, headers=headers, timeout=self.follow_timeout) as reply:
                if reply.is_redirect and headers:
                    url, headers = _store_redirect(reply)
                    continue
                if reply.is_error or reply.is_redirect:
                    reply.read()
                    raise _error(reply)
                yield from reply.iter_bytes(_CHUNK_BYTES)
                return

    def download_artifacts(self, job_id: str, directory: str | os.PathLike[str]) -> list[Path]:
        return [self.download_artifact(job_id, artifact, directory) for artifact in self.artifacts(job_id)]

    def events(self, job_id: str, after: int = 0) -> Iterator[models.JobEvent]:
        """Progress events after seq ``after`` until the job ends; a dropped connection is
        resumed from the last event seen (Last-Event-ID), so no event is lost or repeated."""
        stream = _Stream(job_id, after)
        while not stream.ended:
            try:
                with self.http.stream(
                    "GET",
                    _job_path(job_id, "/events"),
                    timeout=self.follow_timeout,
                    params=stream.request_args()["params"],
                    headers=self._headers(stream.request_args()["headers"]),
                ) as reply:
                    if reply.is_error:
                        reply.read()
                        raise _error(reply)
                    parser = SseParser()
                    for line in reply.iter_lines():
                        parsed = parser.feed(line)
                        if parsed is None:
                            continue
                        event = stream.take(*parsed)
                        if event is not None:
                            yield event
                        if stream.ended:
                            return
                # The connection closed without an end event: resume.
                stream.broke(httpx.RemoteProtocolError("the event stream closed before the job ended"))
            except _STREAM_ERRORS as exc:
                stream.broke(exc)
            time.sleep(RECONNECT_DELAY_S * stream.failures)

    def wait(self, job_id: str, on_event: Callable[[models.JobEvent], None] | None = None) -> models.Job:
        """Follow the job's events to its end and answer its final status."""
        for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
        return self.job(job_id)

    def counterfactual_estimate(self, job_id: str, request: dict[str, Any]) -> models.CounterfactualEstimate:
        """Time and cost of a counterfactual check (gpu_core CounterfactualRequest) of a job."""
        return self._run(_Calls.counterfactual_estimate(job_id, request))

    def submit_counterfactual(
        self, job_id: str, request: dict[str, Any], idempotency_key: str | None = None
    ) -> models.CounterfactualSubmitted:
        """Retrain without the top-k and random controls; follow it with events(check id)."""
        return self._run(_Calls.submit_counterfactual(job_id, request, idempotency_key))

    def counterfactuals(self, job_id: str) -> list[models.CounterfactualCheck]:
        return self._run(_Calls.counterfactuals(job_id))

    def merge_estimate(self, job_id: str, request: dict[str, Any] | None = None) -> models.MergeEstimate:
        """Time and cost of merging the experiment's adapter into its base (gpu_core MergeRequest)."""
        return self._run(_Calls.merge_estimate(job_id, request or {}))

    def submit_merge(
        self, job_id: str, request: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> models.MergeSubmitted:
        """Merge the adapter into the base; follow it with events(merge job id), read it with
        merge(), download its files with download_artifacts(merge job id, ...)."""
        return self._run(_Calls.submit_merge(job_id, request or {}, idempotency_key))

    def merges(self, job_id: str) -> list[models.MergeJob]:
        return self._run(_Calls.merges(job_id))

    def merge(self, job_id: str, merge_job_id: str) -> models.MergeJob:
        return self._run(_Calls.merge(job_id, merge_job_id))

    def counterfactual(self, job_id: str, check_id: str) -> models.CounterfactualCheck:
        return self._run(_Calls.counterfactual(job_id, check_id))

    def submit_query(
        self, job_id: str, request: dict[str, Any], idempotency_key: str | None = None
    ) -> models.QuerySubmitted:
        """Ask the experiment's fine-tuned model (gpu_core QueryRequest); follow it with
        events(query job id), read it with query()."""
        return self._run(_Calls.submit_query(job_id, request, idempotency_key))

    def queries(self, job_id: str) -> list[models.QueryJob]:
        return self._run(_Calls.queries(job_id))

    def training_examples(
        self, job_id: str, sort: str = "suspect", limit: int = 50, offset: int = 0
    ) -> models.TrainingExamples:
        """The experiment's training examples ranked by ``sort`` (harmful, helpful,
        self_influence, loss, worst_harm or suspect), one page."""
        return self._run(_Calls.training_examples(job_id, sort, limit, offset))

    def curation_estimate(self, job_id: str, request: dict[str, Any]) -> models.CurationEstimate:
        """Time and cost of a curation (the body :meth:`submit_curation` takes) before submitting it."""
        return self._run(_Calls.curation_estimate(job_id, request))

    def submit_curation(
        self, job_id: str, request: dict[str, Any], idempotency_key: str | None = None
    ) -> models.CurationSubmitted:
        """Retrain on a selection (``drop_ids``, or a ``drop``/``keep`` rule) against ``controls``
        random selections for each of ``seeds``."""
        return self._run(_Calls.submit_curation(job_id, request, idempotency_key))

    def curations(self, job_id: str) -> list[models.Curation]:
        """The experiment's curations, newest first."""
        return self._run(_Calls.curations(job_id))

    def curation(self, job_id: str, curation_id: str) -> models.Curation:
        return self._run(_Calls.curation(job_id, curation_id))

    def curated_training_set(self, job_id: str, curation_id: str) -> list[models.CuratedExample]:
        """The examples the curation trained on, in the experiment's own format, ids kept."""
        return self._run(_Calls.curated_training_set(job_id, curation_id))

    def experiment_from_curation(
        self, job_id: str, curation_id: str, idempotency_key: str | None = None
    ) -> models.SubmittedJob:
        """Start a new experiment: the experiment's spec with the curation's training set."""
        return self._run(_Calls.experiment_from_curation(job_id, curation_id, idempotency_key))

    def query(self, job_id: str, query_job_id: str) -> models.QueryJob:
        return self._run(_Calls.query(job_id, query_job_id))

    def compute_settings(self) -> models.ComputeSettings:
        return self._run(_Calls.compute_settings())

    def set_backend(self, backend: str) -> models.ComputeSettings:
        return self._run(_Calls.set_backend(backend))

    def runpod_key(self) -> models.RunpodKeyStatus:
        return self._run(_Calls.runpod_key())

    def save_runpod_key(self, api_key: str) -> models.RunpodKeySaved:
        return self._run(_Calls.save_runpod_key(api_key))

    def delete_runpod_key(self) -> models.RunpodKeyDeleted:
        return self._run(_Calls.delete_runpod_key())

    def runpod_endpoint(self) -> models.RunpodEndpoint:
        return self._run(_Calls.runpod_endpoint())

    def delete_runpod_endpoint(self) -> models.RunpodEndpoint:
        return self._run(_Calls.delete_runpod_endpoint())

    # last in the class: below it, ``models`` in an annotation would name this method, not the module
    def models(self) -> list[models.ModelInfo]:
        return self._run(_Calls.model_list())


class AsyncClient(_Base):
    """The asyncio client: the same calls as :class:`Client`, awaited."""

    def __init__(
        self,
        api: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
        follow_timeout_s: float = 120.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(api, token, timeout_s, follow_timeout_s)
        self.http = httpx.AsyncClient(base_url=self.api, timeout=timeout_s, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def _run(self, call: _Call[T]) -> T:
        reply = await self.http.request(
            call.method,
            call.path,
            json=call.json,
            params=call.params,
            content=call.content,
            headers=self._headers(call.headers, call.authenticated),
        )
        if reply.is_error:
            raise _error(reply)
        return call.read(reply)

    async def sign_in(self, username: str) -> models.AccessToken:
        token = await self._run(_Calls.sign_in(username))
        self.token = token.access_token
        return token

    async def config(self) -> models.GatewayConfig:
        return await self._run(_Calls.config())

    async def submit(
        self,
        spec: dict[str, Any] | str | os.PathLike[str],
        idempotency_key: str | None = None,
        max_cost_usd: float | None = None,
    ) -> models.SubmittedJob:
        return await self._run(_Calls.submit(load_spec(spec), idempotency_key, max_cost_usd))

    async def estimate(self, spec: dict[str, Any] | str | os.PathLike[str]) -> models.EstimateAnswer:
        return await self._run(_Calls.estimate(load_spec(spec)))

    async def datasets(self, sha256: str | None = None) -> list[models.Dataset]:
        return await self._run(_Calls.datasets(sha256))

    async def upload_dataset(self, path: str | os.PathLike[str], kind: str = "train") -> models.Dataset:
        path = Path(path)
        digest = await asyncio.to_thread(_file_sha256, path)
        for found in await self.datasets(digest):
            if found.kind == kind:
                return found.model_copy(update={"existing": True})
        return await self._run(_Calls.upload_dataset(kind, path.name, _async_file_chunks(path)))

    async def jobs(
        self,
        limit: int = 50,
        tag: str | None = None,
        model: str | None = None,
        method: str | None = None,
        status: str | None = None,
    ) -> list[models.Job]:
        filters = {"tag": tag, "model": model, "method": method, "status": status}
        return await self._run(_Calls.jobs(limit, filters))

    async def update_labels(self, job_id: str, **labels: Any) -> models.Job:
        return await self._run(_Calls.update_labels(job_id, labels))

    async def compare(self, *job_ids: str) -> models.Comparison:
        return await self._run(_Calls.compare(list(job_ids)))

    async def job(self, job_id: str) -> models.Job:
        return await self._run(_Calls.job(job_id))

    async def results(self, job_id: str) -> dict[str, Any]:
        return await self._run(_Calls.results(job_id))

    async def spec(self, job_id: str) -> dict[str, Any]:
        return await self._run(_Calls.spec(job_id))

    async def cancel(self, job_id: str) -> models.Job:
        return await self._run(_Calls.cancel(job_id))

    async def delete(self, job_id: str) -> models.JobDeleted:
        return await self._run(_Calls.delete(job_id))

    async def artifacts(self, job_id: str) -> list[models.Artifact]:
        return await self._run(_Calls.artifacts(job_id))

    async def download_artifact(
        self, job_id: str, artifact: models.Artifact, directory: str | os.PathLike[str]
    ) -> Path:
        target = Path(directory) / _safe_artifact_name(artifact.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _ArtifactFile(target, artifact) as sink:
            async for chunk in self._artifact_chunks(job_id, artifact.name):
                sink.write(chunk)
        return target

    async def _artifact_chunks(self, job_id: str, name: str) -> AsyncIterator[bytes]:
        url, headers = _artifact_path(job_id, name), self._headers({})
        while True:
            async with self.http.stream("GET", url, headers=headers, timeout=self.follow_timeout) as reply:
                if reply.is_redirect and headers:
                    url, headers = _store_redirect(reply)
                    continue
                if reply.is_error or reply.is_redirect:
                    await reply.aread()
                    raise _error(reply)
                async for chunk in reply.aiter_bytes(_CHUNK_BYTES):
                    yield chunk
                return

    async def download_artifacts(self, job_id: str, directory: str | os.PathLike[str]) -> list[Path]:
        return [await self.download_artifact(job_id, a, directory) for a in await self.artifacts(job_id)]

    async def events(self, job_id: str, after: int = 0) -> AsyncIterator[models.JobEvent]:
        stream = _Stream(job_id, after)
        while not stream.ended:
            try:
                async with self.http.stream(
                    "GET",
                    _job_path(job_id, "/events"),
                    timeout=self.follow_timeout,
                    params=stream.request_args()["params"],
                    headers=self._headers(stream.request_args()["headers"]),
                ) as reply:
                    if reply.is_error:
                        await reply.aread()
                        raise _error(reply)
                    parser = SseParser()
                    async for line in reply.aiter_lines():
                        parsed = parser.feed(line)
                        if parsed is None:
                            continue
                        event = stream.take(*parsed)
                        if event is not None:
                            yield event
                        if stream.ended:
                            return
                stream.broke(httpx.RemoteProtocolError("the event stream closed before the job ended"))
            except _STREAM_ERRORS as exc:
                stream.broke(exc)
            await asyncio.sleep(RECONNECT_DELAY_S * stream.failures)

    async def wait(
        self, job_id: str, on_event: Callable[[models.JobEvent], None] | None = None
    ) -> models.Job:
        async for event in self.events(job_id):
            if on_event is not None:
                on_event(event)
        return await self.job(job_id)

    async def counterfactual_estimate(
        self, job_id: str, request: dict[str, Any]
    ) -> models.CounterfactualEstimate:
        return await self._run(_Calls.counterfactual_estimate(job_id, request))

    async def submit_counterfactual(
        self, job_id: str, request: dict[str, Any], idempotency_key: str | None = None
    ) -> models.CounterfactualSubmitted:
        return await self._run(_Calls.submit_counterfactual(job_id, request, idempotency_key))

    async def counterfactuals(self, job_id: str) -> list[models.CounterfactualCheck]:
        return await self._run(_Calls.counterfactuals(job_id))

    async def merge_estimate(
        self, job_id: str, request: dict[str, Any] | None = None
    ) -> models.MergeEstimate:
        return await self._run(_Calls.merge_estimate(job_id, request or {}))

    async def submit_merge(
        self, job_id: str, request: dict[str, Any] | None = None, idempotency_key: str | None = None
    ) -> models.MergeSubmitted:
        return await self._run(_Calls.submit_merge(job_id, request or {}, idempotency_key))

    async def merges(self, job_id: str) -> list[models.MergeJob]:
        return await self._run(_Calls.merges(job_id))

    async def merge(self, job_id: str, merge_job_id: str) -> models.MergeJob:
        return await self._run(_Calls.merge(job_id, merge_job_id))

    async def counterfactual(self, job_id: str, check_id: str) -> models.CounterfactualCheck:
        return await self._run(_Calls.counterfactual(job_id, check_id))

    async def submit_query(
        self, job_id: str, request: dict[str, Any], idempotency_key: str | None = None
    ) -> models.QuerySubmitted:
        return await self._run(_Calls.submit_query(job_id, request, idempotency_key))

    async def queries(self, job_id: str) -> list[models.QueryJob]:
        return await self._run(_Calls.queries(job_id))

    async def query(self, job_id: str, query_job_id: str) -> models.QueryJob:
        return await self._run(_Calls.query(job_id, query_job_id))

    async def training_examples(
        self, job_id: str, sort: str = "suspect", limit: int = 50, offset: int = 0
    ) -> models.TrainingExamples:
        """The experiment's training examples ranked by ``sort`` (harmful, helpful,
        self_influence, loss, worst_harm or suspect), one page."""
        return await self._run(_Calls.training_examples(job_id, sort, limit, offset))

    async def curation_estimate(self, job_id: str, request: dict[str, Any]) -> models.CurationEstimate:
        return await self._run(_Calls.curation_estimate(job_id, request))

    async def submit_curation(
        self, job_id: str, request: dict[str, Any], idempotency_key: str | None = None
    ) -> models.CurationSubmitted:
        return await self._run(_Calls.submit_curation(job_id, request, idempotency_key))

    async def curations(self, job_id: str) -> list[models.Curation]:
        return await self._run(_Calls.curations(job_id))

    async def curation(self, job_id: str, curation_id: str) -> models.Curation:
        return await self._run(_Calls.curation(job_id, curation_id))

    async def curated_training_set(self, job_id: str, curation_id: str) -> list[models.CuratedExample]:
        return await self._run(_Calls.curated_training_set(job_id, curation_id))

    async def experiment_from_curation(
        self, job_id: str, curation_id: str, idempotency_key: str | None = None
    ) -> models.SubmittedJob:
        return await self._run(_Calls.experiment_from_curation(job_id, curation_id, idempotency_key))

    async def compute_settings(self) -> models.ComputeSettings:
        return await self._run(_Calls.compute_settings())

    async def set_backend(self, backend: str) -> models.ComputeSettings:
        return await self._run(_Calls.set_backend(backend))

    async def runpod_key(self) -> models.RunpodKeyStatus:
        return await self._run(_Calls.runpod_key())

    async def save_runpod_key(self, api_key: str) -> models.RunpodKeySaved:
        return await self._run(_Calls.save_runpod_key(api_key))

    async def delete_runpod_key(self) -> models.RunpodKeyDeleted:
        return await self._run(_Calls.delete_runpod_key())

    async def runpod_endpoint(self) -> models.RunpodEndpoint:
        return await self._run(_Calls.runpod_endpoint())

    async def delete_runpod_endpoint(self) -> models.RunpodEndpoint:
        return await self._run(_Calls.delete_runpod_endpoint())

    # last in the class: below it, ``models`` in an annotation would name this method, not the module
    async def models(self) -> list[models.ModelInfo]:
        return await self._run(_Calls.model_list())


class _ArtifactFile:
    """Writes a download to ``<target>.part``, checks its size and sha256 against the listing,
    then renames it into place; a failed or wrong download leaves no file behind."""

    def __init__(self, target: Path, artifact: models.Artifact) -> None:
        self.target = target
        self.artifact = artifact
        self.partial = target.with_name(target.name + ".part")
        self.digest = hashlib.sha256()
        self.size = 0

    def __enter__(self) -> _ArtifactFile:
        self.file = self.partial.open("wb")
        return self

    def write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)

    def __exit__(self, exc_type: object, *_rest: object) -> None:
        self.file.close()
        if exc_type is not None:
            self.partial.unlink(missing_ok=True)
            return
        if self.size != self.artifact.bytes or self.digest.hexdigest() != self.artifact.sha256:
            self.partial.unlink(missing_ok=True)
            raise ValueError(
                f"artifact {self.artifact.name}: got {self.size} bytes with sha256 "
                f"{self.digest.hexdigest()}; the listing says {self.artifact.bytes} bytes, "
                f"sha256 {self.artifact.sha256}"
            )
        self.partial.replace(self.target)

"""Experiment tracking: each completed experiment is logged, once, to MLflow and/or W&B.

Where: the operator's tracker (MLFLOW_TRACKING_URI, WANDB_PROJECT + WANDB_API_KEY) unless the
experiment's researcher set their own in Settings (profile columns; their W&B key and MLflow
token in keyvault, revealed per export). What: the spec's parameters, the training loss per step,
the evaluation metrics, and links to the run's results and files on the dashboard.

How it stays off the money path: the exporter is a loop of its own that reads what a completed
job stored; a tracker that fails is logged with its name, recorded on the job (``tracking``) and
retried a bounded number of times, and the job stays completed whatever happens. No database
connection is held across a call to a tracker: a job is claimed in one statement (a lease, so a
replica that dies mid-export leaves it to another), exported, then marked in another.

Exactly once per job: ``tracking_status = 'exported'`` is the durable marker in our database;
the trackers' side is keyed by our job id too, for a takeover or a retry after a partial export:
the MLflow run carries the tag ``influence.job_id`` (searched before a run is created, and its
points have fixed timestamps, which MLflow stores once), and the W&B run id is our job id.

MLflow is spoken to over its REST API (httpx, no client library in the service); W&B through
its SDK in a child process (``python -m scheduler.wandb_run``), which keeps its threads, its
``wandb-core`` process and its global state out of the scheduler and can be killed at a deadline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg
import httpx

from influence.v1 import scheduler_pb2
from scheduler.config import Settings, checked_tracking_url
from scheduler.store import Store
from service_runtime.keyvault import KeyVaultError, KeyVaultReader

log = logging.getLogger(__name__)

# keyvault provider names of a researcher's tracker secrets (REVEAL_POLICY lets the scheduler read them).
WANDB_KEY = "wandb"
MLFLOW_TOKEN = "mlflow"
TRACKERS = ("mlflow", "wandb")
# MLflow's log-batch limits (per request): 1000 metrics, 100 params, 100 tags.
_MLFLOW_METRICS_PER_BATCH = 1000
_MLFLOW_PARAMS_PER_BATCH = 100
_PARAM_VALUE_CHARS = 500
_FIRST_RETRY_S = 30.0
_JOB_ID_TAG = "influence.job_id"
# What the W&B child prints before its answer, so that anything the SDK prints is skipped.
WANDB_ANSWER_PREFIX = "influence-wandb-run: "
_PARAM_EXCLUDED = frozenset({"training_data", "eval_data", "name", "tags", "note"})

Source = Literal["operator", "researcher"]


class TrackingError(Exception):
    """A tracker did not take the run; the message names it (and never holds a secret).
    ``component``: what failed when it was not the tracker itself (keyvault, the stored result)."""

    def __init__(self, message: str, component: str = "") -> None:
        super().__init__(message)
        self.component = component


@dataclass(frozen=True)
class MlflowTarget:
    uri: str
    experiment_name: str
    token: str | None
    source: Source


@dataclass(frozen=True)
class WandbTarget:
    project: str
    entity: str
    api_key: str | None
    source: Source


@dataclass(frozen=True)
class TrackedRun:
    """What a tracker receives of one completed experiment."""

    job_id: str
    user_id: str
    name: str
    tags: list[str]
    note: str
    params: dict[str, str]
    # (step, loss, learning rate) per logged training step
    loss: list[tuple[int, float, float]]
    metrics: dict[str, float]
    links: dict[str, str]
    started_ms: int
    finished_ms: int


def _flatten(prefix: str, value: Any, into: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, into)
    elif value is not None:
        text = value if isinstance(value, str) else json.dumps(value)
        into[prefix] = text[:_PARAM_VALUE_CHARS]


def _millis(moment: datetime | None, fallback: int = 0) -> int:
    return int(moment.timestamp() * 1000) if moment is not None else fallback


def tracked_run(
    job: asyncpg.Record, spec: dict[str, Any], result: dict[str, Any], dashboard_url: str
) -> TrackedRun:
    """The run of a completed experiment row (id, user_id, name, tags, note, n_train, n_eval,
    artifacts, created_at, finished_at) with its stored spec and result."""
    params: dict[str, str] = {}
    _flatten("", {k: v for k, v in spec.items() if k not in _PARAM_EXCLUDED}, params)
    params["n_train"] = str(job["n_train"])
    params["n_eval"] = str(job["n_eval"])
    loss = [
        (int(point["step"]), float(point["loss"]), float(point.get("learning_rate", 0.0)))
        for point in (result.get("training") or {}).get("loss_curve", [])
    ]
    metrics: dict[str, float] = {}
    for run_name, run in (result.get("eval_results") or {}).items():
        for key in ("exact_match_rate", "mean_loss"):
            value = (run.get("metrics") or {}).get(key)
            if isinstance(value, (int, float)):
                metrics[f"eval/{run_name}/{key}"] = float(value)
    for key, value in (result.get("timings") or {}).items():
        if isinstance(value, (int, float)):
            metrics[f"time/{key}_s"] = float(value)
    base = f"{dashboard_url}/api/jobs/{job['id']}"
    links = {"results": f"{dashboard_url}/#/jobs/{job['id']}", "artifacts": f"{base}/artifacts"}
    # One link per top-level file or folder (a folder as one zip): checkpoints stay one link.
    for entry in job["artifacts"]:
        head, _, rest = entry["name"].partition("/")
        links[f"artifact/{head}"] = (
            f"{base}/artifacts.zip?prefix={head}/" if rest else f"{base}/artifacts/{head}"
        )
    finished = _millis(job["finished_at"])
    return TrackedRun(
        job_id=str(job["id"]),
        user_id=job["user_id"],
        name=job["name"] or f"experiment {str(job['id'])[:8]}",
        tags=list(job["tags"]),
        note=job["note"],
        params=params,
        loss=loss,
        metrics=metrics,
        links=links,
        started_ms=_millis(job["created_at"], finished),
        finished_ms=finished,
    )


def checked_tracking_settings(request: scheduler_pb2.SetTrackingSettingsRequest) -> tuple[str, str, str, str]:
    """(MLflow URI, experiment name, W&B project, W&B entity) as stored; ValueError naming the field."""
    uri = request.mlflow_tracking_uri.strip()
    if uri:
        try:
            uri = checked_tracking_url(uri)
        except ValueError as exc:
            raise ValueError(f"mlflow_tracking_uri: {exc}") from None
    texts = {
        "mlflow_experiment_name": (request.mlflow_experiment_name.strip(), 500),
        "wandb_project": (request.wandb_project.strip(), 128),
        "wandb_entity": (request.wandb_entity.strip(), 128),
    }
    for name, (text, limit) in texts.items():
        if len(text) > limit or any(not ch.isprintable() for ch in text):
            raise ValueError(f"{name}: at most {limit} printable characters")
    for name in ("wandb_project", "wandb_entity"):
        if any(ch in texts[name][0] for ch in "/\\#?%:"):
            raise ValueError(f"{name}: must not contain / \\ # ? % or :")
    return uri, texts["mlflow_experiment_name"][0], texts["wandb_project"][0], texts["wandb_entity"][0]


# ---- MLflow (REST) ------------------------------------------------------------------------------


class MlflowClient:
    """The few REST calls of an export (https://mlflow.org/docs/latest/api_reference/rest-api.html)."""

    def __init__(self, http: httpx.AsyncClient, target: MlflowTarget) -> None:
        self._http = http
        self._target = target
        self._api = f"{target.uri}/api/2.0/mlflow"
        self._headers = {"Authorization": f"Bearer {target.token}"} if target.token else {}

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            answer = await self._http.request(
                method,
                f"{self._api}/{path}",
                json=body if method == "POST" else None,
                params=None if method == "POST" else body,
                headers=self._headers,
            )
        except httpx.HTTPError as exc:
            raise TrackingError(
                f"MLflow at {self._target.uri} could not be reached ({type(exc).__name__})"
            ) from None
        if answer.status_code >= 400:
            payload = _json_or_empty(answer)
            if payload.get("error_code") in ("RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS"):
                return {"error_code": payload["error_code"]}
            detail = str(payload.get("message") or answer.text)[:300]
            raise TrackingError(
                f"MLflow at {self._target.uri} answered HTTP {answer.status_code} to {path}: {detail}"
            )
        return _json_or_empty(answer)

    async def experiment_id(self) -> str:
        name = self._target.experiment_name
        found = await self._call("GET", "experiments/get-by-name", {"experiment_name": name})
        if "experiment" in found:
            return str(found["experiment"]["experiment_id"])
        created = await self._call("POST", "experiments/create", {"name": name})
        if "experiment_id" in created:
            return str(created["experiment_id"])
        # Another exporter created it in between.
        found = await self._call("GET", "experiments/get-by-name", {"experiment_name": name})
        return str(found["experiment"]["experiment_id"])

    async def export(self, run: TrackedRun) -> dict[str, str]:
        experiment_id = await self.experiment_id()
        found = await self._call(
            "POST",
            "runs/search",
            {
                "experiment_ids": [experiment_id],
                "filter": f"tags.`{_JOB_ID_TAG}` = '{run.job_id}'",
                "max_results": 1,
            },
        )
        existing = found.get("runs") or []
        if existing and existing[0]["info"]["status"] == "FINISHED":
            run_id = str(existing[0]["info"]["run_id"])
        else:
            if existing:  # an export that stopped half-way: finish that run (same points again)
                run_id = str(existing[0]["info"]["run_id"])
            else:
                tags = [
                    {"key": _JOB_ID_TAG, "value": run.job_id},
                    {"key": "mlflow.runName", "value": run.name},
                ]
                created = await self._call(
                    "POST",
                    "runs/create",
                    {
                        "experiment_id": experiment_id,
                        "run_name": run.name,
                        "start_time": run.started_ms,
                        "tags": tags,
                    },
                )
                run_id = str(created["run"]["info"]["run_id"])
            await self._log(run_id, run)
            await self._call(
                "POST", "runs/update", {"run_id": run_id, "status": "FINISHED", "end_time": run.finished_ms}
            )
        return {"run_id": run_id, "url": f"{self._target.uri}/#/experiments/{experiment_id}/runs/{run_id}"}

    async def _log(self, run_id: str, run: TrackedRun) -> None:
        last_step = run.loss[-1][0] if run.loss else 0
        # Fixed timestamps: logging the same point again (a retry) stores nothing new.
        metrics = [
            {"key": key, "value": value, "timestamp": run.finished_ms, "step": step}
            for step, loss, rate in run.loss
            for key, value in (("train/loss", loss), ("train/learning_rate", rate))
        ]
        metrics += [
            {"key": key, "value": value, "timestamp": run.finished_ms, "step": last_step}
            for key, value in run.metrics.items()
        ]
        params = [{"key": key[:250], "value": value} for key, value in run.params.items()]
        tags = [{"key": f"influence.link.{key}", "value": url} for key, url in run.links.items()][:90]
        tags += [{"key": f"influence.tag.{tag}", "value": "true"} for tag in run.tags]
        if run.note:
            tags.append({"key": "mlflow.note.content", "value": run.note})
        tags.append({"key": "influence.user_id", "value": run.user_id})
        for start in range(0, max(len(params), 1), _MLFLOW_PARAMS_PER_BATCH):
            await self._call(
                "POST",
                "runs/log-batch",
                {
                    "run_id": run_id,
                    "params": params[start : start + _MLFLOW_PARAMS_PER_BATCH],
                    "tags": tags[:100] if start == 0 else [],
                },
            )
        for start in range(0, len(metrics), _MLFLOW_METRICS_PER_BATCH):
            await self._call(
                "POST",
                "runs/log-batch",
                {"run_id": run_id, "metrics": metrics[start : start + _MLFLOW_METRICS_PER_BATCH]},
            )


def _json_or_empty(answer: httpx.Response) -> dict[str, Any]:
    try:
        payload = answer.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


# ---- W&B (SDK in a child process) ---------------------------------------------------------------


def wandb_child_env(settings: Settings, target: WandbTarget) -> dict[str, str]:
    """The child's environment: the scheduler's, without any WANDB_*/MLFLOW_* of the operator's
    (a researcher's run must never go out under the operator's key), plus the target's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    folder = os.path.abspath(settings.wandb_dir)
    env.update(
        {
            "WANDB_MODE": settings.wandb_mode,
            "WANDB_DIR": folder,
            # W&B's own settings and caches too (the scheduler's root filesystem is read-only).
            "WANDB_CONFIG_DIR": os.path.join(folder, "config"),
            "WANDB_CACHE_DIR": os.path.join(folder, "cache"),
            "WANDB_DATA_DIR": os.path.join(folder, "data"),
            "WANDB_SILENT": "true",
            "WANDB_CONSOLE": "off",
            "WANDB_DISABLE_GIT": "true",
            "WANDB_DISABLE_CODE": "true",
        }
    )
    if target.api_key:
        env["WANDB_API_KEY"] = target.api_key
    if settings.wandb_base_url:
        env["WANDB_BASE_URL"] = settings.wandb_base_url
    return env


async def export_wandb(settings: Settings, target: WandbTarget, run: TrackedRun) -> dict[str, str]:
    if settings.wandb_mode == "online" and not target.api_key:  # offline/dryrun need none
        raise TrackingError("W&B: no API key (WANDB_API_KEY, or the researcher's in Settings)")
    os.makedirs(settings.wandb_dir, exist_ok=True)
    payload = {
        "project": target.project,
        "entity": target.entity,
        "job_id": run.job_id,
        "name": run.name,
        "tags": run.tags,
        "note": run.note,
        "params": run.params,
        "loss": run.loss,
        "metrics": run.metrics,
        "links": run.links,
    }
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "scheduler.wandb_run",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=wandb_child_env(settings, target),
    )
    try:
        out, err = await asyncio.wait_for(
            child.communicate(json.dumps(payload).encode()), settings.scheduler_tracking_timeout_s
        )
    except TimeoutError:
        child.kill()
        await child.wait()
        raise TrackingError(
            f"W&B: the run was not logged within {settings.scheduler_tracking_timeout_s:g} s"
        ) from None
    for line in reversed(out.decode(errors="replace").splitlines()):
        if line.startswith(WANDB_ANSWER_PREFIX):
            answer: dict[str, str] = json.loads(line[len(WANDB_ANSWER_PREFIX) :])
            return answer
    tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise TrackingError(f"W&B: the run was not logged (exit {child.returncode}): {tail[0][:300]}")


# ---- the exporter loop --------------------------------------------------------------------------

_CLAIM = """
UPDATE jobs SET tracking_status = 'exporting', tracking_attempts = tracking_attempts + 1,
       tracking_lease_until = now() + make_interval(secs => $1)
WHERE id = (
    SELECT id FROM jobs
    WHERE status = 'completed' AND kind = 'experiment'
      AND ((tracking_status = 'pending' AND tracking_next_at <= now())
           OR (tracking_status = 'exporting' AND tracking_lease_until < now()))
    ORDER BY tracking_next_at LIMIT 1 FOR UPDATE SKIP LOCKED)
RETURNING id, user_id, name, tags, note, n_train, n_eval, artifacts, created_at, finished_at,
          tracking, tracking_attempts
"""


@dataclass
class Outcome:
    trackers: dict[str, dict[str, str]] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(entry["status"] == "failed" for entry in self.trackers.values())


class TrackingExporter:
    def __init__(self, settings: Settings, store: Store, keyvault: KeyVaultReader | None) -> None:
        self._settings = settings
        self._store = store
        self._keyvault = keyvault
        self._http = httpx.AsyncClient(timeout=min(settings.scheduler_tracking_timeout_s, 30.0))

    async def close(self) -> None:
        await self._http.aclose()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.export_due()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("tracking export could not read its jobs; will retry", extra={"error": str(exc)})
            except Exception:  # a bug must not end tracking on this replica; the lease retries the job
                log.exception(
                    "tracking export failed unexpectedly", extra={"component": "scheduler-tracking"}
                )
            await asyncio.sleep(self._settings.scheduler_tracking_interval_s)

    async def export_due(self) -> int:
        """Export every experiment that is due now, one at a time; return how many were tried."""
        tried = 0
        lease_s = self._settings.scheduler_tracking_timeout_s * 2 + 30
        while True:
            async with self._store.connection() as conn:
                job = await conn.fetchrow(_CLAIM, lease_s)
            if job is None:
                return tried
            tried += 1
            await self._export(job)

    async def _targets(self, user_id: str) -> tuple[MlflowTarget | None, WandbTarget | None]:
        settings = self._settings
        async with self._store.connection() as conn:
            profile = await conn.fetchrow(
                "SELECT mlflow_tracking_uri, mlflow_experiment_name, wandb_project, wandb_entity "
                "FROM profiles WHERE user_id = $1",
                user_id,
            )
        mlflow: MlflowTarget | None = None
        wandb: WandbTarget | None = None
        if profile is not None and profile["mlflow_tracking_uri"]:
            mlflow = MlflowTarget(
                profile["mlflow_tracking_uri"],
                profile["mlflow_experiment_name"] or settings.mlflow_experiment_name,
                await self._reveal(user_id, MLFLOW_TOKEN),
                "researcher",
            )
        elif settings.mlflow_tracking_uri:
            token = settings.mlflow_tracking_token
            mlflow = MlflowTarget(
                settings.mlflow_tracking_uri,
                settings.mlflow_experiment_name,
                token.get_secret_value() if token else None,
                "operator",
            )
        if settings.wandb_mode == "disabled":
            wandb = None
        elif profile is not None and profile["wandb_project"]:
            key = await self._reveal(user_id, WANDB_KEY)
            wandb = WandbTarget(profile["wandb_project"], profile["wandb_entity"], key, "researcher")
        elif settings.wandb_project:
            key_secret = settings.wandb_api_key
            wandb = WandbTarget(
                settings.wandb_project,
                settings.wandb_entity,
                key_secret.get_secret_value() if key_secret else None,
                "operator",
            )
        return mlflow, wandb

    async def _reveal(self, user_id: str, provider: str) -> str | None:
        if self._keyvault is None:
            return None
        try:
            return await self._keyvault.reveal(user_id, provider)
        except KeyVaultError as exc:
            raise TrackingError(f"keyvault: {exc}", "keyvault") from None

    async def _export(self, job: asyncpg.Record) -> None:
        job_id = str(job["id"])
        done: dict[str, dict[str, str]] = job["tracking"]
        outcome = Outcome({name: entry for name, entry in done.items() if entry.get("status") == "exported"})
        try:
            mlflow, wandb = await self._targets(job["user_id"])
            targets = {"mlflow": mlflow, "wandb": wandb}
            due = {name: t for name, t in targets.items() if t is not None and name not in outcome.trackers}
            if due:
                async with self._store.connection() as conn:
                    stored = await conn.fetchrow("SELECT spec, result FROM jobs WHERE id = $1", job["id"])
                if stored is None:  # deleted meanwhile
                    return
                try:
                    run = tracked_run(
                        job, stored["spec"], stored["result"] or {}, self._settings.tracking_dashboard_url
                    )
                except (KeyError, TypeError, ValueError) as exc:
                    raise TrackingError(
                        f"the stored result is unreadable: {exc!r}", "scheduler-tracking"
                    ) from None
                for name, target in due.items():
                    outcome.trackers[name] = await self._export_one(name, target, run)
        except TrackingError as exc:
            log.warning(
                "experiment tracking failed",
                extra={"job_id": job_id, "component": exc.component, "error": str(exc)},
            )
            outcome.trackers[exc.component] = {"status": "failed", "error": str(exc)}
        await self._record(job, outcome)

    async def _export_one(
        self, name: str, target: MlflowTarget | WandbTarget, run: TrackedRun
    ) -> dict[str, str]:
        try:
            if isinstance(target, MlflowTarget):
                answer = await MlflowClient(self._http, target).export(run)
            else:
                answer = await export_wandb(self._settings, target, run)
        except TrackingError as exc:
            log.warning(
                "experiment tracking failed",
                extra={"job_id": run.job_id, "component": name, "error": str(exc)},
            )
            return {"status": "failed", "error": str(exc), "source": target.source}
        log.info(
            "experiment tracked",
            extra={"job_id": run.job_id, "component": name, "run_id": answer.get("run_id", "")},
        )
        return {"status": "exported", "source": target.source, **answer}

    async def _record(self, job: asyncpg.Record, outcome: Outcome) -> None:
        attempts = int(job["tracking_attempts"])
        if not outcome.trackers:
            status, delay = "none", 0.0
        elif not outcome.failed:
            status, delay = "exported", 0.0
        elif attempts >= self._settings.scheduler_tracking_attempts:
            status, delay = "failed", 0.0
        else:
            status, delay = "pending", _FIRST_RETRY_S * 2 ** (attempts - 1)
        async with self._store.connection() as conn:
            await conn.execute(
                "UPDATE jobs SET tracking_status = $2, tracking = $3::jsonb, tracking_lease_until = NULL, "
                "tracking_next_at = now() + make_interval(secs => $4) WHERE id = $1",
                job["id"],
                status,
                outcome.trackers,
                delay,
            )

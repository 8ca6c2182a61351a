"""Experiment tracking (issue 28): a completed experiment appears in a real MLflow server on
loopback and in a W&B offline run directory with its params, per-step loss and metrics, once;
a tracker that fails is retried a bounded number of times and never touches the job.

The MLflow server starts once for the module (it boots in seconds on an idle machine, under a
minute on a loaded one); the job is a completed experiment row as the scheduler stores one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import httpx
import pytest

from influence.v1 import common_pb2, keyvault_pb2, keyvault_pb2_grpc, scheduler_pb2
from keyvault.config import Settings as KeyVaultSettings
from keyvault.server import start_keyvault

pytestmark = pytest.mark.slow

GATEWAY_TOKEN = "gateway-token-" + "g" * 24
SCHEDULER_TOKEN = "scheduler-token-" + "s" * 24
LOSS = [(step, 2.0 - 0.25 * step, 1e-3) for step in range(1, 7)]
SPEC: dict[str, Any] = {
    "name": "lr sweep a",
    "tags": ["sweep"],
    "model_id": "local/tiny-llama",
    "training_data": [{"id": "t1", "prompt": "2+2=", "completion": "4"}],
    "eval_data": [{"id": "e1", "prompt": "1+1=", "expected": "2"}],
    "hyperparams": {"epochs": 3, "learning_rate": 0.001, "lora_rank": 8},
    "influence_method": "tracin",
}
RESULT: dict[str, Any] = {
    "eval_results": {
        name: {"metrics": {"exact_match_rate": rate, "mean_loss": loss, "n": 1}, "examples": []}
        for name, rate, loss in (("base", 0.0, 3.5), ("few_shot", 0.0, 3.1), ("finetuned", 1.0, 0.4))
    },
    "training": {
        "loss_curve": [{"step": s, "epoch": s / 2, "loss": v, "learning_rate": r} for s, v, r in LOSS]
    },
    "timings": {"train": 12.5},
}
ARTIFACTS = [
    {"name": "scores.npy", "bytes": 8, "sha256": "0" * 64, "media_type": "application/octet-stream"},
    {"name": "adapter/adapter_model.safetensors", "bytes": 8, "sha256": "1" * 64, "media_type": "x"},
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen[bytes]
    log: Path

    async def ready(self) -> str:
        """The URI once the server answers (it boots while the module's first test runs)."""
        deadline = time.monotonic() + 240
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                assert self.process.poll() is None, self.log.read_text()[-2000:]
                try:
                    if (await client.get(f"{self.uri}/health")).status_code == 200:
                        return self.uri
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "mlflow server did not start"
                await asyncio.sleep(0.5)


@pytest.fixture(scope="module", autouse=True)
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """One real `mlflow server` on a loopback port for the module, started before its first test
    (whose keyvault and scheduler need no MLflow) and awaited by the test that uses it."""
    folder = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    with (folder / "server.log").open("wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{folder / 'mlflow.db'}",
                "--default-artifact-root",
                str(folder / "artifacts"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # its workers are one process group, stopped together below
        )
    yield MlflowServer(f"http://127.0.0.1:{port}", process, folder / "server.log")
    os.killpg(process.pid, signal.SIGKILL)  # a throwaway server: nothing to shut down cleanly
    process.wait(20)


async def _completed_experiment(dsn: str, user_id: str) -> str:
    job_id = str(uuid.uuid4())
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """INSERT INTO jobs (id, user_id, provider, status, spec, result, artifacts, name, tags,
                                 model_id, influence_method, n_train, n_eval, finished_at)
               VALUES ($1, $2, 'local', 'completed', $3::jsonb, $4::jsonb, $5::jsonb, $6, $7,
                       'local/tiny-llama', 'tracin', 1, 1, now())""",
            uuid.UUID(job_id),
            user_id,
            json.dumps(SPEC),
            json.dumps(RESULT),
            json.dumps(ARTIFACTS),
            SPEC["name"],
            SPEC["tags"],
        )
    finally:
        await conn.close()
    return job_id


async def _tracking(
    stub: Any, user_id: str, job_id: str, done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The job's tracking as the API shows it, once ``done`` says so; the job stays completed
    and error-free throughout."""
    deadline = time.monotonic() + 120
    while True:
        job = await stub.GetJob(scheduler_pb2.GetJobRequest(user_id=user_id, job_id=job_id))
        assert job.state == common_pb2.JOB_STATE_COMPLETED and job.error == ""
        tracking: dict[str, Any] = json.loads(job.tracking_json or b"{}")
        if done(tracking):
            return tracking
        assert time.monotonic() < deadline, f"tracking stayed {tracking}"
        await asyncio.sleep(0.2)


def _ended(tracking: dict[str, Any]) -> bool:
    return tracking.get("status") in ("exported", "failed")


def _mlflow_runs(uri: str, job_id: str) -> list[dict[str, Any]]:
    api = f"{uri}/api/2.0/mlflow"
    experiment = httpx.get(
        f"{api}/experiments/get-by-name", params={"experiment_name": "influence-test"}
    ).json()
    found = httpx.post(
        f"{api}/runs/search",
        json={
            "experiment_ids": [experiment["experiment"]["experiment_id"]],
            "filter": f"tags.`influence.job_id` = '{job_id}'",
        },
    ).json()
    runs: list[dict[str, Any]] = found.get("runs", [])
    return runs


def _wandb_records(run_file: Path) -> list[Any]:
    """The records of a W&B run file (.wandb: a LevelDB-style log of wandb_internal_pb2.Record:
    a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header crc32/length/type)."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


async def test_a_researchers_trackers_with_a_key_from_keyvault_and_a_failing_tracker(
    start: Any, database_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bob's own W&B (key in keyvault, revealed by the scheduler only for the export) takes the
    run; his own MLflow is down: retried a bounded number of times, then recorded as failed,
    and the job stays completed."""
    wandb_key = "wk" + secrets.token_hex(20)
    vault = await start_keyvault(
        KeyVaultSettings(
            database_url=database_url,
            runpod_key_encryption_secret=base64.b64encode(os.urandom(32)).decode(),
            keyvault_caller_tokens=f"gateway={GATEWAY_TOKEN},scheduler={SCHEDULER_TOKEN}",
            keyvault_host="127.0.0.1",
            keyvault_port=0,
            keyvault_metrics_port=-1,
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{vault.port}") as channel:
            vault_stub = keyvault_pb2_grpc.KeyVaultStub(channel)
            for provider in ("wandb", "runpod"):
                await vault_stub.StoreKey(
                    keyvault_pb2.StoreKeyRequest(user_id="bob", provider=provider, plaintext=wandb_key),
                    metadata=(("x-caller-token", GATEWAY_TOKEN),),
                )
            # The scheduler may reveal a researcher's tracker secrets, nothing else.
            with pytest.raises(grpc.aio.AioRpcError, match="'scheduler' may not reveal keys of 'runpod'"):
                await vault_stub.RevealKey(
                    keyvault_pb2.KeyRef(user_id="bob", provider="runpod"),
                    metadata=(("x-caller-token", SCHEDULER_TOKEN),),
                )
        wandb_dir = tmp_path / "wandb"
        scheduler = await start(
            scheduler_tracking_interval_s=0.2,
            scheduler_tracking_attempts=2,
            keyvault_addr=f"127.0.0.1:{vault.port}",
            keyvault_token=SCHEDULER_TOKEN,
            wandb_mode="offline",
            wandb_dir=str(wandb_dir),
        )
        dead = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
        with pytest.raises(grpc.aio.AioRpcError, match="mlflow_tracking_uri: must not contain a user name"):
            await scheduler.stub.SetTrackingSettings(
                scheduler_pb2.SetTrackingSettingsRequest(user_id="bob", mlflow_tracking_uri="http://u:p@host")
            )
        chosen = await scheduler.stub.SetTrackingSettings(
            scheduler_pb2.SetTrackingSettingsRequest(
                user_id="bob", mlflow_tracking_uri=dead + "/", wandb_project="bobs-project"
            )
        )
        assert chosen.mlflow_tracking_uri == dead and chosen.wandb_project == "bobs-project"
        assert not chosen.operator_mlflow and not chosen.operator_wandb

        job_id = await _completed_experiment(database_url, "bob")
        first = await _tracking(scheduler.stub, "bob", job_id, lambda t: bool(t.get("trackers")))
        assert first["status"] == "pending", first  # one failure: retried later (30 s, doubling)
        assert f"MLflow at {dead} could not be reached" in first["trackers"]["mlflow"]["error"]
        assert first["trackers"]["wandb"]["status"] == "exported"
        assert first["trackers"]["wandb"]["source"] == "researcher"
        [run_dir] = list((wandb_dir / "wandb").glob(f"offline-run-*-{job_id}"))
        [header] = [
            r.run
            for r in _wandb_records(run_dir / f"run-{job_id}.wandb")
            if r.WhichOneof("record_type") == "run"
        ]
        assert header.project == "bobs-project"
        # Bring the retry forward instead of waiting out the backoff: the last try fails it.
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("UPDATE jobs SET tracking_next_at = now() WHERE id = $1", uuid.UUID(job_id))
        finally:
            await conn.close()
        final = await _tracking(scheduler.stub, "bob", job_id, lambda t: t.get("status") == "failed")
        assert final["trackers"]["mlflow"]["status"] == "failed"
        assert final["trackers"]["wandb"]["status"] == "exported"  # not logged a second time
        assert len(list((wandb_dir / "wandb").glob("offline-run-*"))) == 1
        assert any(getattr(r, "component", "") == "mlflow" for r in caplog.records)
        assert wandb_key not in caplog.text and wandb_key not in json.dumps(final)
    finally:
        await vault.stop()


async def test_an_experiment_is_logged_to_mlflow_and_wandb_once(
    start: Any, database_url: str, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    mlflow_uri = await mlflow_server.ready()
    wandb_dir = tmp_path / "wandb"
    scheduler = await start(
        mlflow_tracking_uri=mlflow_uri,
        mlflow_experiment_name="influence-test",
        wandb_project="influence-test",
        wandb_mode="offline",
        wandb_dir=str(wandb_dir),
        tracking_dashboard_url="https://dash.example",
        scheduler_tracking_interval_s=0.2,
    )
    job_id = await _completed_experiment(database_url, "alice")
    tracking = await _tracking(scheduler.stub, "alice", job_id, _ended)
    assert tracking["status"] == "exported", tracking
    assert tracking["trackers"]["mlflow"]["source"] == "operator"

    # MLflow: one run with the params, the loss at every step, the evaluations and the links.
    [run] = _mlflow_runs(mlflow_uri, job_id)
    run_id = run["info"]["run_id"]
    assert tracking["trackers"]["mlflow"]["run_id"] == run_id
    assert run["info"]["status"] == "FINISHED" and run["info"]["run_name"] == "lr sweep a"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["hyperparams.learning_rate"] == "0.001" and params["model_id"] == "local/tiny-llama"
    assert params["influence_method"] == "tracin" and params["n_train"] == "1"
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert metrics["eval/finetuned/exact_match_rate"] == 1.0 and metrics["eval/base/mean_loss"] == 3.5
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["influence.link.artifact/adapter"] == (
        f"https://dash.example/api/jobs/{job_id}/artifacts.zip?prefix=adapter/"
    )
    assert tags["influence.link.results"] == f"https://dash.example/#/jobs/{job_id}"

    def loss_history() -> list[tuple[int, float]]:
        answer = httpx.get(
            f"{mlflow_uri}/api/2.0/mlflow/metrics/get-history",
            params={"run_id": run_id, "metric_key": "train/loss"},
        ).json()
        return sorted((m["step"], m["value"]) for m in answer["metrics"])

    assert loss_history() == [(step, loss) for step, loss, _ in LOSS]

    # W&B offline: the run directory (run id = job id) holds the same.
    [run_dir] = list((wandb_dir / "wandb").glob(f"offline-run-*-{job_id}"))
    records = _wandb_records(run_dir / f"run-{job_id}.wandb")
    [header] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in header.config.update}
    assert header.project == "influence-test" and header.display_name == "lr sweep a"
    assert config["hyperparams.learning_rate"] == "0.001" and config["links"]["results"].endswith(job_id)
    history = [
        {
            item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
            for item in r.history.item
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    assert [(row["_step"], row["train/loss"]) for row in history] == [(s, v) for s, v, _ in LOSS]
    summary = {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert summary["eval/finetuned/exact_match_rate"] == 1.0 and summary["time/train_s"] == 12.5

    # A replica that died after MLflow took the run but before it recorded so (its lease ran
    # out, W&B's part already recorded): the takeover finds the MLflow run and logs nothing twice.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            """UPDATE jobs SET tracking_status = 'exporting', tracking_lease_until = now() - interval '1 s',
                   tracking = tracking - 'mlflow' WHERE id = $1""",
            uuid.UUID(job_id),
        )
    finally:
        await conn.close()
    tracking = await _tracking(scheduler.stub, "alice", job_id, _ended)
    assert tracking["status"] == "exported" and tracking["trackers"]["mlflow"]["run_id"] == run_id
    assert len(_mlflow_runs(mlflow_uri, job_id)) == 1
    assert loss_history() == [(step, loss) for step, loss, _ in LOSS]
    assert len(list((wandb_dir / "wandb").glob("offline-run-*"))) == 1

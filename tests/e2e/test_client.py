"""The Python client (influence_client) and the ``influence`` command against the whole stack
on loopback: the CLI as a separate process, the sync and async clients in this one."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.stack import REPO_ROOT, Stack
from influence_client import AsyncClient, Client, InfluenceError, eval_rows, influence_rows

from ..browser.support import sample_spec
from .actual_cost import assert_actual_cost

pytestmark = pytest.mark.e2e

SAMPLE = json.loads((REPO_ROOT / "examples" / "sample.json").read_text())
INFLUENCE = Path(sys.executable).with_name("influence")
STAGES = ("loading_model", "eval_base", "eval_few_shot", "training", "eval_finetuned", "influence")


def small_spec(n_train: int = 8, n_eval: int = 3, epochs: int = 2) -> dict:
    return sample_spec(n_train, n_eval, epochs)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with Stack(
        data_dir=tmp_path_factory.mktemp("client-stack"),
        extra_env={"SCHEDULER_POLL_INTERVAL_S": "0.2", "COMPUTE_LOCAL_TORCH_THREADS": "1"},
        services=("keyvault", "compute-local", "scheduler", "gateway"),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def cli_env(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The CLI's environment: the stack's gateway in INFLUENCE_API, its own config directory."""
    env = {
        **os.environ,
        "INFLUENCE_API": stack.gateway_url,
        "XDG_CONFIG_HOME": str(tmp_path_factory.mktemp("cli-config")),
    }
    env.pop("INFLUENCE_TOKEN", None)
    return env


def influence(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(INFLUENCE), *args], env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, f"influence {' '.join(args)}: {done.stdout}\n{done.stderr}"
    return done


def test_cli_submit_follow_results_status_and_jobs(
    stack: Stack, cli_env: dict[str, str], tmp_path: Path
) -> None:
    refused = influence(cli_env, "jobs", check=False)
    assert refused.returncode == 1 and "influence login" in refused.stderr

    login = influence(cli_env, "login", "--username", "carol")
    assert stack.gateway_url in login.stdout
    credentials = Path(cli_env["XDG_CONFIG_HOME"]) / "influence" / "credentials.json"
    assert credentials.stat().st_mode & 0o077 == 0, "the token file is private"

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(small_spec()))
    followed = influence(cli_env, "submit", str(spec_path), "--follow")
    job_id = followed.stdout.split("submitted job ", 1)[1].split()[0]
    progress = followed.stderr.splitlines()
    for stage in STAGES:
        assert any(line.startswith(stage) for line in progress), f"no {stage} line in {progress}"
    training = [line for line in progress if line.startswith("training") and "epoch" in line]
    assert training and "loss " in training[-1] and "%" in training[-1]
    assert any("ETA " in line for line in progress)
    assert progress[-1].startswith(f"job {job_id} completed after ")

    client = Client(stack.gateway_url)
    client.sign_in("carol")
    api_result = client.results(job_id)

    as_json = influence(cli_env, "results", job_id)
    assert json.loads(as_json.stdout) == api_result

    csv_file = tmp_path / "scores.csv"
    influence(cli_env, "results", job_id, "--format", "csv", "-o", str(csv_file))
    rows = list(csv.DictReader(csv_file.open()))
    expected = influence_rows(api_result)
    assert len(rows) == 3 * 8 == len(expected)
    for row, want in zip(rows, expected, strict=True):
        assert (row["eval_id"], row["train_id"]) == (want["eval_id"], want["train_id"])
        assert float(row["score"]) == want["score"]

    evals = influence(cli_env, "results", job_id, "--format", "csv", "--table", "evals").stdout
    eval_table = list(csv.DictReader(io.StringIO(evals)))
    assert [(r["run"], r["eval_id"], r["output"]) for r in eval_table] == [
        (r["run"], r["eval_id"], r["output"]) for r in eval_rows(api_result)
    ]

    download = tmp_path / "artifacts"
    listing = influence(cli_env, "artifacts", job_id, "--download", str(download)).stdout
    listed = {artifact.name: artifact for artifact in client.artifacts(job_id)}
    assert {"scores.npy", "adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= set(listed)
    for name, artifact in listed.items():
        assert name in listing
        fetched = (download / name).read_bytes()
        assert len(fetched) == artifact.bytes and hashlib.sha256(fetched).hexdigest() == artifact.sha256
    assert not list(download.rglob("*.part"))

    status = influence(cli_env, "status", job_id).stdout
    assert status.startswith(f"{job_id}  completed  100%")
    # compute-local's host time, at the local table's rate for the host (no GPU charge).
    actual = assert_actual_cost(
        client.job(job_id).model_dump(mode="json"), "local", "host", "compute-local host time"
    )
    assert f"actual: {actual['gpu_seconds']:.1f} GPU-s on host at $0.000000/s = $0.0000" in status
    assert json.loads(influence(cli_env, "status", job_id, "--json").stdout)["status"] == "completed"
    assert job_id in influence(cli_env, "jobs").stdout

    missing = influence(cli_env, "status", "no-such-job", check=False)
    assert missing.returncode == 1 and "404: Job not found" in missing.stderr
    invalid = tmp_path / "invalid.json"
    invalid.write_text(json.dumps({**small_spec(), "eval_data": []}))
    refused_spec = influence(cli_env, "submit", str(invalid), check=False)
    assert refused_spec.returncode == 1
    assert "eval_data: needs at least one eval example" in refused_spec.stderr


def test_cli_cancel_stops_a_running_job(stack: Stack, cli_env: dict[str, str], tmp_path: Path) -> None:
    influence(cli_env, "login", "--username", "dave")
    spec_path = tmp_path / "long.json"
    spec_path.write_text(json.dumps(small_spec(n_train=26, n_eval=8, epochs=100)))
    job_id = influence(cli_env, "submit", str(spec_path)).stdout.split("submitted job ", 1)[1].split()[0]
    client = Client(stack.gateway_url)
    client.sign_in("dave")
    for event in client.events(job_id):
        if event.stage == "training":
            break
    assert influence(cli_env, "cancel", job_id).stdout.split() == [job_id, "cancelled"]
    assert client.wait(job_id).status == "cancelled"


def test_python_client_submit_idempotent_follow_with_resume_and_results(stack: Stack, tmp_path: Path) -> None:
    with Client(stack.gateway_url) as client:
        client.sign_in("erin")
        config = client.config()
        assert config.limits.max_text_chars == 20_000
        assert "tracin" in [method.value for method in config.influence_methods]
        tiny = next(model for model in client.models() if model.id == "local/tiny-llama")
        assert tiny.presets["learning_rate"] == SAMPLE["hyperparams"]["learning_rate"]

        spec = small_spec()
        first = client.submit(spec, idempotency_key="sweep-lr-0.004")
        again = client.submit(spec, idempotency_key="sweep-lr-0.004")
        assert again.job_id == first.job_id

        # Stop after a few events and resume from the last seq: nothing lost, nothing repeated.
        head = []
        for event in client.events(first.job_id):
            head.append(event)
            if len(head) == 3:
                break
        tail = list(client.events(first.job_id, after=head[-1].seq))
        seqs = [event.seq for event in head + tail]
        assert seqs == list(range(1, len(seqs) + 1))
        assert tail[-1].type == "status" and tail[-1].state == "completed"
        assert any(event.model_extra.get("loss") is not None for event in tail if event.stage == "training")

        job = client.job(first.job_id)
        assert job.status == "completed" and job.n_train == 8
        result = client.results(first.job_id)
        assert result["influence"]["train_ids"] == [t["id"] for t in spec["training_data"]]
        assert client.spec(first.job_id)["hyperparams"]["epochs"] == 2
        assert first.job_id in [listed.job_id for listed in client.jobs()]

        saved = client.download_artifacts(first.job_id, tmp_path)
        assert (tmp_path / "scores.npy") in saved
        deleted = client.delete(first.job_id)
        assert deleted.deleted and deleted.deleted_artifacts == len(saved)
        with pytest.raises(InfluenceError) as gone:
            client.job(first.job_id)
        assert gone.value.status == 404

        with pytest.raises(InfluenceError) as refused:
            client.submit({**spec, "hyperparams": {"learning_rate": 0}})
        assert refused.value.status == 422
        assert [problem.field for problem in refused.value.detail] == ["hyperparams.learning_rate"]


def test_event_stream_survives_a_gateway_restart(stack: Stack) -> None:
    client = Client(stack.gateway_url)
    client.sign_in("frank")
    job_id = client.submit(small_spec(n_train=26, n_eval=8, epochs=6)).job_id
    seen = []
    restarted = False
    for event in client.events(job_id):
        seen.append(event)
        if event.stage == "training" and not restarted:
            # The generator is paused here: its connection dies with the old gateway.
            stack.stop_service("gateway")
            stack.start_service("gateway")
            restarted = True
    assert restarted
    seqs = [event.seq for event in seen]
    assert seqs == list(range(1, len(seqs) + 1)), "the stream resumed after the last event seen"
    assert seen[-1].state == "completed"


def test_async_client_follows_to_the_end(stack: Stack) -> None:
    async def run() -> tuple[str, dict, list[str]]:
        async with AsyncClient(stack.gateway_url) as client:
            await client.sign_in("grace")
            job = await client.submit(small_spec(n_train=6, n_eval=2, epochs=1))
            stages: list[str] = []
            final = await client.wait(job.job_id, on_event=lambda e: stages.append(e.stage or e.type))
            return final.status, await client.results(job.job_id), stages

    status, result, stages = asyncio.run(run())
    assert status == "completed"
    assert [stage for stage in STAGES if stage in stages] == list(STAGES)
    assert len(result["influence"]["scores"]) == 2


def test_cli_submit_train_file_stores_it_once_as_a_dataset(
    stack: Stack, cli_env: dict[str, str], tmp_path: Path
) -> None:
    influence(cli_env, "login", "--username", "dora")
    spec = small_spec()
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(example) + "\n" for example in spec.pop("training_data")))
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    job_ids = []
    for already in ("", " (already stored)"):
        submitted = influence(cli_env, "submit", str(spec_path), "--train", str(train))
        first = submitted.stdout.splitlines()[0]
        assert first.startswith("train.jsonl: dataset ds_") and first.endswith(
            f", 8 examples (prompt / completion){already}"
        )
        job_ids.append(submitted.stdout.split("submitted job ", 1)[1].split()[0])
        influence(cli_env, "cancel", job_ids[-1])
    client = Client(stack.gateway_url)
    client.sign_in("dora")
    (dataset,) = client.datasets()
    assert {client.spec(job_id)["training_dataset_id"] for job_id in job_ids} == {dataset.dataset_id}

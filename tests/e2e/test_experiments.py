"""Experiments as a researcher keeps them, through the whole stack on loopback (real PostgreSQL,
compute-local on the tiny model): names, tags and notes set at submit and changed later, the
list's outcome and filters, two runs compared, checkpoints as one zip, and the CLI for each."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest

from devstack.stack import Stack
from influence_client import Client, InfluenceError

from ..browser.support import sample_spec

pytestmark = pytest.mark.e2e

INFLUENCE = Path(sys.executable).with_name("influence")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    with Stack(
        data_dir=tmp_path_factory.mktemp("experiments-stack"),
        extra_env={"SCHEDULER_POLL_INTERVAL_S": "0.2", "COMPUTE_LOCAL_TORCH_THREADS": "1"},
        services=("keyvault", "compute-local", "scheduler", "gateway"),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def runs(stack: Stack) -> dict[str, str]:
    """Two finished runs of the same data at different learning rates, and a third, untagged one
    on another method; submitted together so they run side by side."""
    client = Client(stack.gateway_url)
    client.sign_in("dana")
    specs = {
        "low": {**sample_spec(6, 2, 2), "name": "lr low", "tags": ["lr-sweep", "first"], "note": "baseline"},
        "high": {**sample_spec(6, 2, 2), "name": "lr high", "tags": ["lr-sweep"]},
        "other": {**sample_spec(6, 2, 1), "influence_method": "datainf"},
    }
    specs["low"]["hyperparams"]["learning_rate"] = 0.001
    ids = {key: client.submit(spec).job_id for key, spec in specs.items()}
    for job_id in ids.values():
        assert client.wait(job_id).status == "completed"
    return ids


def _client(stack: Stack, user: str) -> Client:
    client = Client(stack.gateway_url)
    client.sign_in(user)
    return client


def test_labels_outcome_run_time_and_filters(stack: Stack, runs: dict[str, str]) -> None:
    client = _client(stack, "dana")
    listed = {job.job_id: job for job in client.jobs()}
    low = listed[runs["low"]]
    assert (low.name, low.tags, low.note) == ("lr low", ["lr-sweep", "first"], "baseline")
    assert listed[runs["other"]].name is None and listed[runs["other"]].tags == []
    results = client.results(runs["low"])["eval_results"]
    assert low.outcome["finetuned"] == results["finetuned"]["metrics"]
    assert low.outcome["base"] == results["base"]["metrics"]
    assert low.run_time_s is not None and 0 < low.run_time_s < 600
    assert low.started_at is not None and low.started_at <= (low.finished_at or "")

    assert {job.job_id for job in client.jobs(tag="lr-sweep")} == {runs["low"], runs["high"]}
    assert [job.job_id for job in client.jobs(tag="first")] == [runs["low"]]
    assert [job.job_id for job in client.jobs(method="datainf")] == [runs["other"]]
    assert len(client.jobs(model="local/tiny-llama", status="completed")) == 3
    assert client.jobs(status="failed") == [] and client.jobs(tag="nope") == []
    # Later jobs never show in the experiments list, filtered or not.
    assert all(job.job_id in runs.values() for job in client.jobs(status="completed"))


def test_labels_change_later_for_the_owner_only(stack: Stack, runs: dict[str, str]) -> None:
    client = _client(stack, "dana")
    job_id = runs["other"]
    changed = client.update_labels(job_id, name="datainf try", tags=["methods", "methods"])
    assert (changed.name, changed.tags, changed.note) == ("datainf try", ["methods"], None)
    noted = client.update_labels(job_id, note="kept the defaults")
    assert (noted.name, noted.tags, noted.note) == ("datainf try", ["methods"], "kept the defaults")
    assert client.job(job_id).name == "datainf try"
    assert [job.job_id for job in client.jobs(tag="methods")] == [job_id]
    # The stored spec carries the labels; what the run computed is untouched.
    spec = client.spec(job_id)
    assert (spec["name"], spec["tags"]) == ("datainf try", ["methods"])
    assert spec["influence_method"] == "datainf"
    cleared = client.update_labels(job_id, name=None, tags=[])
    assert (cleared.name, cleared.tags, cleared.note) == (None, [], "kept the defaults")

    with pytest.raises(InfluenceError) as refused:
        client.update_labels(job_id, tags=["two words"])
    assert refused.value.status == 422 and "tags" in str(refused.value)
    with pytest.raises(InfluenceError) as refused:
        client.update_labels(job_id, colour="red")
    assert refused.value.status == 422 and "colour" in str(refused.value)

    stranger = _client(stack, "eve")
    with pytest.raises(InfluenceError) as hidden:
        stranger.update_labels(job_id, name="mine now")
    assert hidden.value.status == 404
    assert client.job(job_id).name is None


def test_compare_two_learning_rates(stack: Stack, runs: dict[str, str]) -> None:
    client = _client(stack, "dana")
    comparison = client.compare(runs["low"], runs["high"])
    assert comparison.ids == [runs["low"], runs["high"]]
    assert [run.name for run in comparison.runs] == ["lr low", "lr high"]
    assert comparison.config_diff == {"hyperparams.learning_rate": [0.001, 0.004]}
    results = [client.results(runs[key]) for key in ("low", "high")]
    for evaluation in ("base", "few_shot", "finetuned"):
        assert comparison.metrics[evaluation] == [r["eval_results"][evaluation]["metrics"] for r in results]
    assert [len(curve) for curve in comparison.loss_curves] == [
        len(r["training"]["loss_curve"]) for r in results
    ]
    assert [example["id"] for example in comparison.examples] == results[0]["influence"]["eval_ids"]
    first = comparison.examples[0]
    assert [answers["finetuned"]["output"] for answers in first["answers"]] == [
        r["eval_results"]["finetuned"]["examples"][0]["output"] for r in results
    ]
    agreement = comparison.influence_agreement
    assert agreement["available"]
    (pair,) = agreement["pairs"]
    assert set(pair["top_k_overlap"]) == set(results[0]["influence"]["eval_ids"])
    assert 0 <= pair["mean_top_k_overlap"] <= 1
    assert -1 <= pair["net_influence_spearman"] <= 1

    # Different methods on the same data still compare; the spec differences are named.
    three = client.compare(runs["low"], runs["high"], runs["other"])
    assert three.config_diff["influence_method"] == ["tracin", "tracin", "datainf"]
    assert len(three.influence_agreement["pairs"]) == 3


def test_compare_refuses_other_users_and_wrong_counts(stack: Stack, runs: dict[str, str]) -> None:
    client = _client(stack, "dana")
    for ids in ([runs["low"]], [runs["low"]] * 2, [runs["low"], runs["high"], runs["other"], "a", "b"]):
        with pytest.raises(InfluenceError) as refused:
            client.compare(*ids)
        assert refused.value.status == 422 and "ids" in str(refused.value)
    stranger = _client(stack, "eve")
    with pytest.raises(InfluenceError) as hidden:
        stranger.compare(runs["low"], runs["high"])
    assert hidden.value.status == 404
    with pytest.raises(InfluenceError) as hidden:
        client.compare(runs["low"], "00000000-0000-0000-0000-000000000000")
    assert hidden.value.status == 404


def test_checkpoints_download_as_one_streamed_zip(stack: Stack, runs: dict[str, str]) -> None:
    client = _client(stack, "dana")
    job_id = runs["low"]
    checkpoints = {a.name: a for a in client.artifacts(job_id) if a.name.startswith("checkpoints/")}
    assert len(checkpoints) >= 2
    headers = {"Authorization": f"Bearer {client.token}"}
    url = f"{stack.gateway_url}/api/jobs/{job_id}/artifacts.zip"
    reply = httpx.get(url, params={"prefix": "checkpoints/"}, headers=headers, timeout=60)
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/zip"
    assert "content-length" not in reply.headers  # streamed as it is built
    with zipfile.ZipFile(io.BytesIO(reply.content)) as archive:
        assert set(archive.namelist()) == set(checkpoints)
        for name, artifact in checkpoints.items():
            assert hashlib.sha256(archive.read(name)).hexdigest() == artifact.sha256
    missing = httpx.get(url, params={"prefix": "nothing/"}, headers=headers, timeout=60)
    assert missing.status_code == 404 and "nothing/" in missing.json()["detail"]
    stranger = _client(stack, "eve")
    hidden = httpx.get(url, headers={"Authorization": f"Bearer {stranger.token}"}, timeout=60)
    assert hidden.status_code == 404


def test_cli_jobs_by_tag_and_compare(stack: Stack, runs: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, "INFLUENCE_API": stack.gateway_url, "XDG_CONFIG_HOME": str(tmp_path)}
    env.pop("INFLUENCE_TOKEN", None)

    def influence(*args: str) -> str:
        done = subprocess.run([str(INFLUENCE), *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"influence {' '.join(args)}: {done.stdout}\n{done.stderr}"
        return done.stdout

    influence("login", "--username", "dana")
    listed = influence("jobs", "--tag", "lr-sweep").splitlines()
    assert len(listed) == 2 and {line.split()[0] for line in listed} == {runs["low"], runs["high"]}
    low_line = next(line for line in listed if line.startswith(runs["low"]))
    assert "lr low" in low_line and "lr-sweep,first" in low_line and "EM " in low_line

    printed = influence("compare", runs["low"], runs["high"])
    lines = printed.splitlines()
    assert "lr low" in lines[0] and "lr high" in lines[0]
    rate = next(line for line in lines if "hyperparams.learning_rate" in line)
    assert rate.split()[1:] == ["0.001", "0.004"]
    comparison = json.loads(influence("compare", runs["low"], runs["high"], "--json"))
    tuned = comparison["metrics"]["finetuned"]
    em_line = next(line for line in lines if "finetuned exact_match_rate" in line)
    assert em_line.split()[2:] == [f"{m['exact_match_rate']:.4g}" for m in tuned]
    assert "influence agreement lr low vs lr high" in printed

"""Model ids per backend: the catalog, hub ids and local/tiny-llama everywhere; local directories
only under ALLOWED_MODEL_DIRS on hosted; every refusal states the rule."""

from __future__ import annotations

import grpc
import pytest

from influence.v1 import scheduler_pb2
from scheduler.config import Settings
from scheduler.model_ids import ModelNotAllowed, check_model_id
from service_runtime.settings import SettingsError

ROOTS = ("/srv/models", "/data/weights")


@pytest.mark.parametrize(
    "model_id",
    [
        "local/tiny-llama",
        "local/tiny-chat",
        "Qwen/Qwen2.5-0.5B",
        "qwen/qwen2.5-0.5b-instruct",
        "someone/their-model_v2.1",
        "org/name@main",
        "org/name@0123abcd",
        "/srv/models/llama",
        "/data/weights/a/b",
    ],
)
def test_allowed_on_hosted(model_id: str) -> None:
    check_model_id(model_id, hosted=True, roots=ROOTS)


@pytest.mark.parametrize(
    ("model_id", "says"),
    [
        ("/etc", "local directory that is not allowed on the hosted backend"),
        ("../x", "local directory that is not allowed"),
        ("./model", "local directory"),
        ("~/model", "local directory"),
        ("/srv/models/../../etc", "local directory"),
        ("/srv/modelsX/evil", "local directory"),
        ("local/other", "the built-in local models are local/tiny-llama, local/tiny-chat"),
        ("org/..", "not a model this deployment runs"),
        ("org/name/extra", "not a model this deployment runs"),
        ("just-a-name", "not a model this deployment runs"),
        ("C:\\models\\x", "local directory"),
    ],
)
def test_refused_on_hosted_with_the_rule(model_id: str, says: str) -> None:
    with pytest.raises(ModelNotAllowed) as caught:
        check_model_id(model_id, hosted=True, roots=ROOTS)
    message = str(caught.value)
    assert says in message
    assert "hub id (org/name, optionally @revision)" in message
    if "local directory" in says:
        assert "/srv/models, /data/weights" in message


def test_a_listed_directory_may_itself_be_the_model() -> None:
    check_model_id("/srv/models", hosted=True, roots=ROOTS)
    check_model_id("/srv/models/", hosted=True, roots=ROOTS)


def test_byok_allows_hub_ids_but_no_operator_directory() -> None:
    check_model_id("anyone/any-model@v3", hosted=False, roots=ROOTS)
    with pytest.raises(ModelNotAllowed) as caught:
        check_model_id("/srv/models/llama", hosted=False, roots=ROOTS)
    assert "on your own RunPod account" in str(caught.value)


def test_no_roots_listed_says_so() -> None:
    with pytest.raises(ModelNotAllowed) as caught:
        check_model_id("/srv/models/llama", hosted=True, roots=())
    assert "ALLOWED_MODEL_DIRS is empty" in str(caught.value)


def test_allowed_model_dirs_setting_is_checked() -> None:
    settings = Settings.load(database_url="postgresql://x/y", allowed_model_dirs=" /srv/models/ ,/data ")
    assert settings.model_dir_roots == ("/srv/models", "/data")
    for bad in ("relative/dir", "/srv/../etc", "/"):
        with pytest.raises(SettingsError) as caught:
            Settings.load(database_url="postgresql://x/y", allowed_model_dirs=bad)
        assert "ALLOWED_MODEL_DIRS" in str(caught.value)


async def test_submit_refuses_a_directory_before_storing_anything(start, h, database_url) -> None:
    scheduler = await start(allowed_model_dirs="/srv/models")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scheduler.stub.SubmitJob(
            scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json(model_id="/etc"))
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'/etc' is a local directory that is not allowed" in caught.value.details()
    listed = await scheduler.stub.SubmitJob(
        scheduler_pb2.SubmitJobRequest(user_id="alice", spec_json=h.spec_json(model_id="/srv/models/m"))
    )
    jobs = await scheduler.stub.ListJobs(scheduler_pb2.ListJobsRequest(user_id="alice"))
    assert [job.id for job in jobs.jobs] == [listed.id]

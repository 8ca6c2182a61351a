"""The Modal app module: its function's settings, and its body run locally."""

from __future__ import annotations

import importlib.util
from typing import Any

import modal
import pytest

from compute_modal.config import Settings
from compute_modal.inprocess import WORKER_APP


def load_recording(monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[Any, dict[str, Any]]:
    """Import worker/modal_app.py afresh, recording what it passes to Modal's builders."""
    seen: dict[str, Any] = {"pip": [], "sources": []}
    real_function, real_pip, real_source = (
        modal.App.function,
        modal.Image.pip_install,
        modal.Image.add_local_python_source,
    )

    def function(self: modal.App, **kwargs: Any) -> Any:
        seen["function"] = kwargs
        return real_function(self, **kwargs)

    def pip_install(self: modal.Image, *packages: str, **kwargs: Any) -> modal.Image:
        seen["pip"].append((packages, kwargs))
        return real_pip(self, *packages, **kwargs)

    def add_local_python_source(self: modal.Image, *modules: str, **kwargs: Any) -> modal.Image:
        seen["sources"].extend(modules)
        return real_source(self, *modules, **kwargs)

    monkeypatch.setattr(modal.App, "function", function)
    monkeypatch.setattr(modal.Image, "pip_install", pip_install)
    monkeypatch.setattr(modal.Image, "add_local_python_source", add_local_python_source)
    spec = importlib.util.spec_from_file_location(name, WORKER_APP)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, seen


def test_app_function_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODAL_GPU", raising=False)
    module, seen = load_recording(monkeypatch, "modal_app_default")
    assert module.app.name == "influence-dashboard"
    options = seen["function"]
    assert options["gpu"] == "A100-80GB"
    assert options["timeout"] == 7200
    volume = options["volumes"][module.HF_CACHE_DIR]
    assert isinstance(volume, modal.Volume) and module.HF_CACHE_DIR.endswith("/.cache/huggingface")
    assert options["secrets"] == []  # deploys on a fresh workspace: no secret to create first
    # Never an unbounded fan-out of the operator's GPUs; compute-modal estimates with the same cap.
    assert options["max_containers"] == 8 == Settings.load().modal_max_containers
    # The decorated function carries the same GPU and volume.
    function_spec = module.run_experiment_job._spec_
    assert function_spec.gpus == "A100-80GB"
    assert set(function_spec.volumes) == {module.HF_CACHE_DIR}
    packages = [p for packages, _ in seen["pip"] for p in packages]
    assert "torch==2.13.0" in packages and "peft==0.21.2" in packages and "bitsandbytes==0.50.2" in packages
    assert (("kronfluence==1.0.1",), {"extra_options": "--no-deps"}) in seen["pip"]
    assert seen["sources"] == ["gpu_core"]


def test_the_container_cap_comes_from_the_deploy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_MAX_CONTAINERS", "3")
    _, seen = load_recording(monkeypatch, "modal_app_capped")
    assert seen["function"]["max_containers"] == 3
    for bad in ("0", "65", "eight"):
        monkeypatch.setenv("MODAL_MAX_CONTAINERS", bad)
        with pytest.raises(
            ValueError, match=f"MODAL_MAX_CONTAINERS must be a whole number from 1 to 64, not '{bad}'"
        ):
            load_recording(monkeypatch, "modal_app_bad_cap")


def test_app_loads_and_would_deploy_with_no_secrets_defined(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the real modal package and no credentials: no function of the app needs a secret,
    and importing it looks none up (``modal deploy`` resolves every named secret)."""
    monkeypatch.delenv("MODAL_HF_SECRET", raising=False)
    for name in ("MODAL_TOKEN_ID", "MODAL_TOKEN_SECRET"):
        monkeypatch.delenv(name, raising=False)
    looked_up: list[str] = []
    real_from_name = modal.Secret.from_name

    def from_name(name: str, *args: Any, **kwargs: Any) -> modal.Secret:
        looked_up.append(name)
        return real_from_name(name, *args, **kwargs)

    monkeypatch.setattr(modal.Secret, "from_name", from_name)
    module, _ = load_recording(monkeypatch, "modal_app_no_secrets")
    functions = [v for v in vars(module).values() if isinstance(v, modal.Function)]
    assert functions and all(f._spec_.secrets == [] for f in functions)
    assert looked_up == []


def test_hf_token_secret_only_when_the_operator_names_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_HF_SECRET", "my-hf-token")
    module, seen = load_recording(monkeypatch, "modal_app_hf_secret")
    (secret,) = seen["function"]["secrets"]
    assert isinstance(secret, modal.Secret) and len(module.run_experiment_job._spec_.secrets) == 1
    assert "my-hf-token" in repr(secret)


def test_gpu_comes_from_the_deploy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODAL_GPU", "H100")
    module, seen = load_recording(monkeypatch, "modal_app_h100")
    assert seen["function"]["gpu"] == "H100"
    assert module.run_experiment_job._spec_.gpus == "H100"


def test_progress_writer_keeps_the_last_events_and_a_counter() -> None:
    from compute_modal.inprocess import load_worker_app

    app = load_worker_app()
    store: dict[str, Any] = {}
    writer = app.ProgressWriter(store, "job-1", keep=3)
    for step in range(5):
        writer.add({"type": "progress", "step": step})
    entry = store["job-1"]
    assert entry["seq"] == 5
    assert [item["seq"] for item in entry["events"]] == [3, 4, 5]
    assert [item["event"]["step"] for item in entry["events"]] == [2, 3, 4]
    writer.finish("failed", "ValueError: boom")
    assert (store["job-1"]["state"], store["job-1"]["error"]) == ("failed", "ValueError: boom")


def test_the_function_body_runs_a_counterfactual_check_by_its_kind() -> None:
    from benchmarks.planted import planted_duplicate_spec, stand_in_result
    from compute_modal.inprocess import InProcessDict, load_worker_app
    from gpu_core.jobs import COUNTERFACTUAL, make_payload
    from gpu_core.schemas import parse_spec

    app = load_worker_app()
    spec = parse_spec(planted_duplicate_spec("tracin", 6, 2, epochs=2)).model_dump(mode="json")
    payload = make_payload(COUNTERFACTUAL, spec, {"k": 1, "controls": 1}, stand_in_result(spec))
    store = InProcessDict()
    result = app.run_job("job-cf", payload, store, "fc-1")["result"]
    assert result["removed_ids"] == ["t0", "t3"] and len(result["control_removed_ids"]) == 1
    entry = store["job-cf"]
    assert entry["state"] == "completed"
    assert {item["event"].get("stage") for item in entry["events"][1:]} == {"counterfactual"}

    # A request that does not fit is the job's plain error (a return value, not a raise).
    outcome = app.run_job("job-bad", {**payload, "request": {"k": 0}}, store, "fc-2")
    assert "k: Input should be greater than or equal to 1" in outcome["error"]
    assert store["job-bad"]["state"] == "failed" and "k: Input" in store["job-bad"]["error"]


def test_a_rerun_in_a_new_container_continues_the_counter() -> None:
    """Modal reruns a preempted input: the new container's events come after the old ones."""
    from compute_modal.inprocess import load_worker_app

    app = load_worker_app()
    store: dict[str, Any] = {}
    first = app.ProgressWriter(store, "job-1")
    for step in range(3):
        first.add({"type": "progress", "step": step})
    rerun = app.ProgressWriter(store, "job-1")
    rerun.add({"type": "status", "message": "GPU container started"})
    assert store["job-1"]["seq"] == 4
    assert [item["seq"] for item in store["job-1"]["events"]] == [1, 2, 3, 4]


def test_sdk_handles_are_built_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new Function/Dict handle hydrates with its own lookup RPC: build each once."""
    from pydantic import SecretStr

    from compute_modal.adapter import ModalSdkAdapter

    built: list[str] = []
    monkeypatch.setattr(modal.Function, "from_name", lambda *a, **k: built.append("function") or object())
    monkeypatch.setattr(modal.Dict, "from_name", lambda *a, **k: built.append("dict") or object())
    adapter = ModalSdkAdapter(SecretStr("ak-x"), SecretStr("as-x"), "main", "app", "fn", "progress")
    adapter._client = object()  # type: ignore[assignment] - no connection in this test
    assert adapter._function() is adapter._function()
    assert adapter._dict() is adapter._dict()
    assert built == ["function", "dict"]


def test_deploy_names_come_from_the_settings_compute_modal_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """`make modal-deploy` creates the app, function and Dict that compute-modal looks up: the same
    variables, the same defaults."""
    from compute_modal.config import Settings

    for name in ("MODAL_APP_NAME", "MODAL_FUNCTION_NAME", "MODAL_PROGRESS_DICT"):
        monkeypatch.delenv(name, raising=False)
    module, seen = load_recording(monkeypatch, "modal_app_default_names")
    defaults = Settings.load()
    assert module.app.name == defaults.modal_app_name
    assert seen["function"]["name"] == defaults.modal_function_name
    assert module.PROGRESS_DICT == defaults.modal_progress_dict

    monkeypatch.setenv("MODAL_APP_NAME", "influence-staging")
    monkeypatch.setenv("MODAL_FUNCTION_NAME", "run_staging_job")
    monkeypatch.setenv("MODAL_PROGRESS_DICT", "influence-staging-progress")
    module, seen = load_recording(monkeypatch, "modal_app_staging_names")
    settings = Settings.load()
    assert module.app.name == settings.modal_app_name == "influence-staging"
    assert seen["function"]["name"] == settings.modal_function_name == "run_staging_job"
    assert module.PROGRESS_DICT == settings.modal_progress_dict == "influence-staging-progress"

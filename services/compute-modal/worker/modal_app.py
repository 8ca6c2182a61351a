"""The Modal app that runs experiments on Modal GPUs under the operator's account.

Deploy with ``make modal-deploy`` (``modal deploy services/compute-modal/worker/modal_app.py``); it
needs no secret. At deploy time ``MODAL_APP_NAME``, ``MODAL_FUNCTION_NAME`` and
``MODAL_PROGRESS_DICT`` name the app, its function and the progress Dict (the variables
compute-modal reads, same defaults); ``MODAL_GPU`` is the function's default GPU (default
``A100-80GB``); ``MODAL_MAX_CONTAINERS`` caps the containers (GPUs) the function runs at once
(default 8; set compute-modal's to the same: its estimates count shard jobs by it);
``MODAL_HF_SECRET`` names a Modal secret holding ``HF_TOKEN`` for gated Hugging Face models (none
by default: a secret that does not exist would fail the deploy). compute-modal spawns the function
by name on the GPU each job's estimate priced (``Function.with_options(gpu=...)``: the tier's GPU,
or ``MODAL_GPU`` when the operator sets it for compute-modal too), keeps the returned
``FunctionCall`` id as the provider job id, reads progress from the Dict under the job id, and
reads the outcome with ``FunctionCall.get``. The run's files (scores.npy, the adapter, checkpoints)
go straight into the dashboard's artifact store through the presigned PUT URLs the scheduler minted
(in the spec's ``artifact_transport``); the result carries only their manifest. A follow-up query's
payload carries ``parent_artifacts``, presigned GETs of the experiment's files, downloaded (size
and sha256 checked) into a temporary folder the query reads.

Exactly once on our job id: before any GPU work the body claims the job in the progress Dict
(``<job_id>#claim``, ``put(..., skip_if_exists=True)``, Modal's put-if-absent) with its own
FunctionCall id. A rerun of the same input (after a preemption) finds its own id and goes on; a
second call for the same job id (a duplicate spawn) finds another call's id and returns a plain
"Duplicate delivery" error without GPU work. When the transport carries the result record's URL
(gpu_core.uploads ``RESULT_NAME``) the result JSON is also written to the artifact store.

Outcome (the function's return value): ``{"result": <ExperimentResult>}`` or ``{"error": "<plain
message>"}``. A failure is returned as a message, not raised: Modal would pickle the exception,
and classes from torch or transformers cannot be rebuilt in compute-modal, which has neither.

Progress entry (``PROGRESS_DICT[job_id]``): ``{"seq": events written so far, "events": the last
MAX_EVENTS_KEPT events, each {"seq", "time", "event"}, "state": "running" | "completed" |
"failed" | "cancelled", "error": str}``. When Modal reruns the input (after a preemption) the new
container continues the counter, so the rerun's events follow the first run's. compute-modal
removes the entry once it has read the end of the job; Modal expires an entry after 7 days
without access.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import modal

log = logging.getLogger(__name__)
# The same variables (and defaults) compute-modal reads (compute_modal/config.py): the names the
# deploy creates are the names the service looks up.
APP_NAME = os.environ.get("MODAL_APP_NAME", "influence-dashboard")
FUNCTION_NAME = os.environ.get("MODAL_FUNCTION_NAME", "run_experiment_job")
PROGRESS_DICT = os.environ.get("MODAL_PROGRESS_DICT", "influence-progress")
HF_CACHE_VOLUME = "influence-hf-cache"
HF_CACHE_DIR = "/root/.cache/huggingface"
DEFAULT_GPU = "A100-80GB"
TIMEOUT_S = 7200
MAX_EVENTS_KEPT = 200

GPU = os.environ.get("MODAL_GPU", DEFAULT_GPU)
HF_SECRET = os.environ.get("MODAL_HF_SECRET", "")
# compute-modal's default (cost_model's DEFAULT_MODAL_MAX_CONTAINERS; this module imports only
# gpu_core); gpu_core.schemas.MAX_SHARDS bounds it.
DEFAULT_MAX_CONTAINERS = 8


def max_containers(value: str) -> int:
    """``MODAL_MAX_CONTAINERS``: without a cap every queued job and shard would get its own GPU on
    the operator's account at once."""
    from gpu_core.schemas import MAX_SHARDS

    if not value.strip():
        return DEFAULT_MAX_CONTAINERS
    if not value.strip().isdigit() or not 1 <= int(value) <= MAX_SHARDS:
        raise ValueError(f"MODAL_MAX_CONTAINERS must be a whole number from 1 to {MAX_SHARDS}, not {value!r}")
    return int(value)


MAX_CONTAINERS = max_containers(os.environ.get("MODAL_MAX_CONTAINERS", ""))

# The pinned GPU stack (the versions the dev venv tests with); PyPI's Linux torch wheel bundles
# CUDA. kronfluence goes in without its dependencies: it declares torchvision, never imports it.
image = (
    modal.Image.debian_slim(python_version="3.11")
    .pip_install(
        "torch==2.13.0",
        "transformers==5.24.0",
        "peft==0.21.2",
        "accelerate==1.15.0",
        "bitsandbytes==0.50.2",
        "safetensors==0.8.0",
        "tokenizers==0.23.3",
        "numpy==2.4.6",
        "scipy==1.17.1",
        "tqdm==4.70.1",
        "pydantic==2.14.4",
        "einconv==0.1.0",
        "einops==0.8.2",
        "opt_einsum==3.4.0",
    )
    .pip_install("kronfluence==1.0.1", extra_options="--no-deps")
    .env({"HF_HOME": HF_CACHE_DIR, "GPU_CORE_CACHE_DIR": f"{HF_CACHE_DIR}/influence-dashboard"})
    .add_local_python_source("gpu_core")
)

app = modal.App(APP_NAME, image=image)
hf_cache = modal.Volume.from_name(HF_CACHE_VOLUME, create_if_missing=True)
progress_store = modal.Dict.from_name(PROGRESS_DICT, create_if_missing=True)


CLAIM_SUFFIX = "#claim"


class ProgressStore(Protocol):
    """What a job needs of its progress store: a modal.Dict (not a MutableMapping), or the
    in-process stand-in (compute_modal.inprocess.InProcessDict)."""

    def get(self, key: str, default: Any = None, /) -> Any: ...

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool: ...

    def __setitem__(self, key: str, value: Any, /) -> None: ...


def claim_job(store: ProgressStore, job_id: str, call_id: str) -> bool:
    """Whether this call may run job ``job_id``: it claimed it first, or it is a rerun of the
    call that did (Modal reruns a preempted input under the same FunctionCall id)."""
    key = job_id + CLAIM_SUFFIX
    return store.put(key, call_id, skip_if_exists=True) or store.get(key) == call_id


class ProgressWriter:
    """Writes one job's progress entry: a counter plus the last ``keep`` events."""

    def __init__(self, store: ProgressStore, job_id: str, keep: int = MAX_EVENTS_KEPT) -> None:
        self._store = store
        self._job_id = job_id
        self._keep = keep
        earlier = store.get(job_id)  # a rerun of the same input continues the counter
        self._entry: dict[str, Any] = {
            "seq": int(earlier["seq"]) if isinstance(earlier, dict) else 0,
            "events": list(earlier["events"]) if isinstance(earlier, dict) else [],
            "state": "running",
            "error": "",
        }

    def add(self, event: dict[str, Any]) -> None:
        self._entry["seq"] += 1
        events = self._entry["events"]
        events.append({"seq": self._entry["seq"], "time": time.time(), "event": event})
        del events[: -self._keep]
        self._flush()

    def finish(self, state: str, error: str = "") -> None:
        self._entry["state"] = state
        self._entry["error"] = error
        self._flush()

    def _flush(self) -> None:
        self._store[self._job_id] = self._entry


def upload_urls(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """The spec without its ``artifact_transport`` entry, and the presigned PUT URL per artifact
    name that compute-modal put there (none: the dashboard's store is not reachable from Modal,
    and the run keeps no files)."""
    spec = dict(spec)
    transport = spec.pop("artifact_transport", None)
    urls = transport.get("urls") if isinstance(transport, dict) else None
    return spec, urls if isinstance(urls, dict) else {}


def run_job(job_id: str, spec: dict[str, Any], store: ProgressStore, call_id: str) -> dict[str, Any]:
    """The function body: run the job, report every event to ``store[job_id]``, upload an
    experiment's files to their presigned URLs, return the outcome (see the module docstring).
    ``spec`` is the gpu_core.jobs payload: an experiment's spec, or a later job of one (e.g. a
    counterfactual check) that ``job_events`` dispatches on its kind. A cancellation
    (``InputCancellation``, a BaseException raised in this thread) closes the pipeline's
    generator, which stops the work within one batch and frees the GPU, and propagates
    unchanged."""
    # gpu_core imports torch: imported here so deploying needs no torch locally.
    from gpu_core.datasets import parse_dataset_files, read_payload_datasets, reading_event
    from gpu_core.hf_token import HF_TOKEN_FIELD, HfTokenForLoad
    from gpu_core.schemas import ArtifactEntry
    from gpu_core.uploads import (
        ArtifactUploadError,
        can_store_result,
        download_artifacts,
        download_event,
        duplicate_delivery_message,
        parse_parent_artifacts,
        store_result,
        upload_artifacts,
    )

    if not claim_job(store, job_id, call_id):
        # Not the job's progress entry: that belongs to the call that holds the claim.
        return {"error": duplicate_delivery_message(job_id)}
    # The body's wall time is the job's GPU time as Modal bills it (the container holds the GPU
    # for the whole body); compute-modal reports it as the job's usage.
    started = time.monotonic()
    spec, urls = upload_urls(spec)
    # The researcher's own Hugging Face token, set as HF_TOKEN only while the model loads.
    hf_token = HfTokenForLoad(spec.pop(HF_TOKEN_FIELD, ""))
    writer = ProgressWriter(store, job_id)
    writer.add(
        {"type": "status", "stage": "loading_model", "progress": 0.0, "message": "GPU container started"}
    )
    artifacts = Path(tempfile.mkdtemp(prefix="influence-artifacts-")) if urls else None
    # A later job (a follow-up query) reads the experiment's files from here; what is missing it
    # recomputes.
    parent_dir = Path(tempfile.mkdtemp(prefix="influence-parent-")) if "kind" in spec else None
    datasets_dir = Path(tempfile.mkdtemp(prefix="influence-datasets-"))
    events = None
    try:
        # Inside the try: a payload that does not fit is the job's error, not a silent "running".
        downloads = parse_parent_artifacts(spec.pop("parent_artifacts", None))
        if downloads and parent_dir is not None:
            writer.add(download_event(downloads))
            download_artifacts(downloads, parent_dir)
        # The stored datasets the spec names, read into it (size and sha256 checked).
        dataset_files = parse_dataset_files(spec.pop("datasets", None))
        if dataset_files:
            reading = reading_event(spec.get("spec", spec))
            if reading is not None:
                writer.add(reading)
            spec = read_payload_datasets(spec, dataset_files, datasets_dir)
        hf_token.start()
        events = job_events(spec, artifacts, parent_dir)
        for event in events:
            hf_token.seen(event)
            if event.get("type") == "result":
                if artifacts is not None:
                    # An experiment's or a merge's files (gpu_core.jobs.WRITES_ARTIFACTS).
                    manifest = [
                        ArtifactEntry.model_validate(e) for e in event["result"].get("artifacts") or []
                    ]
                    upload_artifacts(artifacts, manifest, urls)
                if can_store_result(urls):
                    try:
                        store_result(urls, event["result"])
                    except ArtifactUploadError as exc:  # the result still returns through Modal
                        log.warning("the result was not written to the artifact store: %s", exc)
                writer.finish("completed")
                return {"result": event["result"], "usage": _usage(started)}
            writer.add(event)
        message = "the experiment ended without a result"
    except modal.exception.InputCancellation:
        writer.finish("cancelled", "cancelled")
        raise
    except Exception as exc:  # returned as plain words, not as a pickled exception
        message = f"{type(exc).__name__}: {exc}"
    finally:
        hf_token.end()
        if events is not None:
            events.close()
        for folder in (artifacts, parent_dir, datasets_dir):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
    writer.finish("failed", message)
    return {"error": message, "usage": _usage(started)}


def _usage(started: float) -> dict[str, Any]:
    return {"gpu_seconds": time.monotonic() - started, "source": "Modal function wall time"}


def job_events(
    payload: dict[str, Any], artifacts_dir: Path | None = None, parent_artifacts_dir: Path | None = None
) -> Any:
    """The job's gpu_core generator, by its kind (gpu_core.jobs)."""
    # gpu_core.pipeline imports torch: imported here so deploying needs no torch locally.
    from gpu_core.jobs import parse_payload, run_job

    return run_job(parse_payload(payload), artifacts_dir, parent_artifacts_dir=parent_artifacts_dir)


# ``gpu`` is the default; compute-modal asks for each job's priced GPU with ``with_options``.
@app.function(
    name=FUNCTION_NAME,
    gpu=GPU,
    timeout=TIMEOUT_S,
    max_containers=MAX_CONTAINERS,
    volumes={HF_CACHE_DIR: hf_cache},
    secrets=[modal.Secret.from_name(HF_SECRET, required_keys=["HF_TOKEN"])] if HF_SECRET else [],
)
def run_experiment_job(job_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    try:
        return run_job(job_id, spec, progress_store, modal.current_function_call_id() or "")
    finally:
        # Models downloaded by this run stay cached for the next container.
        hf_cache.commit()

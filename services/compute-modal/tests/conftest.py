"""Fixtures: compute-modal on a real gRPC server (port 0) over the in-process Modal."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from compute_modal.config import Settings
from compute_modal.inprocess import InProcessDict, InProcessModal, load_worker_app
from compute_modal.server import ComputeModalServer, start_service
from influence.v1 import compute_pb2_grpc


@pytest.fixture
def make_spec() -> Callable[..., dict[str, Any]]:
    return tiny_spec


def tiny_spec(**hyperparams: Any) -> dict[str, Any]:
    return {
        "model_id": "local/tiny-llama",
        "training_data": [{"prompt": f"{i} plus one is ", "completion": str(i + 1)} for i in range(6)],
        "eval_data": [
            {"prompt": "2 plus one is ", "expected": "3"},
            {"prompt": "4 plus one is ", "expected": "5"},
        ],
        "hyperparams": {"epochs": 2, "batch_size": 4, "max_seq_len": 32, "max_new_tokens": 3, **hyperparams},
        "few_shot_k": 1,
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class NotifyingStore(MutableMapping[str, Any]):
    """The progress dict as the body sees it; sets ``training`` once a training event lands."""

    def __init__(self, inner: InProcessDict) -> None:
        self.inner = inner
        self.training = threading.Event()

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        return self.inner.put(key, value, skip_if_exists=skip_if_exists)

    def __setitem__(self, key: str, value: Any) -> None:
        self.inner[key] = value
        if any(item["event"].get("stage") == "training" for item in value.get("events", [])):
            self.training.set()

    def __getitem__(self, key: str) -> Any:
        return self.inner[key]

    def __delitem__(self, key: str) -> None:
        del self.inner[key]

    def __iter__(self):
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)


@dataclass
class Harness:
    service: ComputeModalServer
    adapter: InProcessModal
    stub: compute_pb2_grpc.ComputeProviderStub
    clock: Clock
    gate: threading.Event
    store_view: Callable[[], NotifyingStore | None]
    body_started: threading.Event


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_job = load_worker_app().run_job
    views: list[NotifyingStore] = []
    body_started = threading.Event()

    def body(job_id: str, spec: dict[str, Any], store: InProcessDict, call_id: str) -> dict[str, Any]:
        view = NotifyingStore(store)
        views.append(view)
        body_started.set()
        return run_job(job_id, spec, view, call_id)

    clock, gate = Clock(), threading.Event()
    gate.set()
    adapter = InProcessModal(body, gate=gate, clock=clock)
    settings = Settings.load(
        compute_modal_port=0, compute_modal_metrics_port=-1, compute_modal_backend="inprocess"
    )
    service = await start_service(settings, adapter, registry=CollectorRegistry())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    try:
        yield Harness(
            service,
            adapter,
            compute_pb2_grpc.ComputeProviderStub(channel),
            clock,
            gate,
            lambda: views[-1] if views else None,
            body_started,
        )
    finally:
        await channel.close()
        await service.stop()

"""An in-process Modal for tests and offline demos: runs the Modal app's function body
(``worker/modal_app.py: run_job``, the real gpu_core pipeline) in a thread of this process, with a
plain dict as the progress Dict.

It reproduces what compute-modal relies on (https://modal.com/docs/guide/job-queue): ``spawn`` returns an
``fc-`` id at once; ``get`` raises the builtin ``TimeoutError`` while the call is queued or
running, returns the (serialised and restored) value when done, re-raises the function's own
exception (``ExecutionError`` if it cannot be serialised), raises ``OutputExpiredError`` for an
unknown id, ``result_retention_s`` after completion, or a call cancelled before it started (no
outputs and no unfinished inputs), and ``RemoteError`` after ``cancel`` of a running call.
Cancelling a running call raises ``InputCancellation`` (a BaseException) inside the body
asynchronously, as Modal's SIGUSR1 handler does in a container.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.util
import pickle
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import modal.exception

WORKER_APP = Path(__file__).resolve().parents[1] / "worker" / "modal_app.py"
_MODULE_NAME = "influence_modal_app"
RESULT_RETENTION_S = 7 * 24 * 3600

Body = Callable[[str, dict[str, Any], "InProcessDict", str], dict[str, Any]]


class InProcessDict(dict[str, Any]):
    """The progress Dict: a dict with modal.Dict's ``put``, whose ``skip_if_exists`` is atomic
    (one lock), as Modal's server-side put-if-absent is."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()

    def put(self, key: str, value: Any, *, skip_if_exists: bool = False) -> bool:
        with self._lock:
            if skip_if_exists and key in self:
                return False
            self[key] = value
            return True


def load_worker_app() -> ModuleType:
    """Import worker/modal_app.py (defining the App makes no network call)."""
    module = sys.modules.get(_MODULE_NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(_MODULE_NAME, WORKER_APP)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the Modal app from {WORKER_APP}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_MODULE_NAME] = module
        spec.loader.exec_module(module)
    return module


class _CancelledBeforeStart(Exception):
    pass


@dataclass
class _Call:
    job_id: str
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    in_body: bool = False  # cancel() may raise InputCancellation in the thread
    finished_at: float = 0.0
    output: bytes = b""  # pickled ("ok", value) or ("error", exception)
    thread: threading.Thread | None = None


class InProcessModal:
    """Implements ``ModalAdapter``. ``gate``: calls wait for it before starting (a cold start);
    ``deployed=False``: lookups fail as for an app that was never deployed."""

    def __init__(
        self,
        body: Body | None = None,
        *,
        gate: threading.Event | None = None,
        deployed: bool = True,
        result_retention_s: float = RESULT_RETENTION_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._body = body or load_worker_app().run_job
        self._gate = gate
        self._deployed = deployed
        self._retention_s = result_retention_s
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, _Call] = {}
        self.progress = InProcessDict()
        # The GPU type each job was spawned on, by our job id (what with_options(gpu=) asks of Modal).
        self.gpus: dict[str, str] = {}

    async def check(self) -> None:
        if not self._deployed:
            # What Function.from_name(...).hydrate raises for an app that was never deployed.
            raise modal.exception.NotFoundError("Lookup failed for Function 'run_experiment_job'")

    async def spawn(self, job_id: str, spec: dict[str, Any], gpu: str) -> str:
        await self.check()
        self.gpus[job_id] = gpu
        call_id = f"fc-{secrets.token_hex(12)}"
        call = _Call(job_id=job_id)
        # Arguments travel serialised, as they do to a container.
        arguments = pickle.loads(pickle.dumps((job_id, spec)))
        call.thread = threading.Thread(
            target=self._run, args=(call, call_id, arguments), name=f"modal-{call_id}", daemon=True
        )
        with self._lock:
            self._calls[call_id] = call
        call.thread.start()
        return call_id

    def _run(self, call: _Call, call_id: str, arguments: tuple[str, dict[str, Any]]) -> None:
        try:
            if self._gate is not None:
                self._gate.wait()
            with self._lock:
                if call.cancelled:
                    raise _CancelledBeforeStart
                call.in_body = True
            value = self._body(*arguments, self.progress, call_id)
            output: tuple[str, Any] = ("ok", value)
            with self._lock:
                # From here on cancel() injects nothing; drop an injection not yet delivered.
                call.in_body = False
                _set_async_exception(threading.get_ident(), None)
        except _CancelledBeforeStart:
            output = ("expired", None)
        except modal.exception.InputCancellation:
            output = ("error", modal.exception.RemoteError("Function call was cancelled"))
        except BaseException as exc:  # a container reports every failure as output
            output = ("error", exc)
        with self._lock:
            call.in_body = False
        try:
            payload = pickle.dumps(output)
        except Exception as exc:  # what Modal does with an unserialisable output
            payload = pickle.dumps(("error", modal.exception.ExecutionError(f"could not serialise: {exc}")))
        with self._lock:
            call.output = payload
            call.finished_at = self._clock()
            call.done.set()

    async def get(self, call_id: str) -> dict[str, Any]:
        with self._lock:
            call = self._calls.get(call_id)
        if call is None:
            raise modal.exception.OutputExpiredError(f"no output for {call_id}")
        if not call.done.is_set():
            raise TimeoutError()
        if self._clock() - call.finished_at > self._retention_s:
            raise modal.exception.OutputExpiredError(f"the output of {call_id} has expired")
        kind, value = pickle.loads(call.output)
        if kind == "expired":
            raise modal.exception.OutputExpiredError(f"{call_id} has no outputs and no unfinished inputs")
        if kind == "error":
            raise value
        return value

    async def cancel(self, call_id: str) -> None:
        with self._lock:
            call = self._calls.get(call_id)
            if call is None or call.done.is_set():
                return
            call.cancelled = True
            if call.in_body and call.thread is not None and call.thread.ident is not None:
                _set_async_exception(call.thread.ident, modal.exception.InputCancellation)

    async def read_progress(self, key: str) -> Any:
        return pickle.loads(pickle.dumps(self.progress.get(key)))

    async def write_progress(self, key: str, value: Any) -> None:
        self.progress[key] = value

    async def put_progress_if_absent(self, key: str, value: Any) -> bool:
        return self.progress.put(key, pickle.loads(pickle.dumps(value)), skip_if_exists=True)

    async def delete_progress(self, key: str) -> None:
        self.progress.pop(key, None)

    async def wait(self, call_id: str, timeout: float | None = None) -> bool:
        """Wait until a call has finished (tests); True when it has."""
        with self._lock:
            call = self._calls[call_id]
        return await asyncio.to_thread(call.done.wait, timeout)

    async def shutdown(self) -> None:
        """Cancel every call still queued or running and wait for their threads."""
        with self._lock:
            pending = [(cid, call) for cid, call in self._calls.items() if not call.done.is_set()]
        for call_id, _call in pending:
            await self.cancel(call_id)
        if self._gate is not None:
            self._gate.set()
        for _call_id, call in pending:
            if call.thread is not None:
                await asyncio.to_thread(call.thread.join)


def _set_async_exception(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise ``exception`` in thread ``thread_id`` at its next bytecode (None clears a pending one)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception is not None else None
    )

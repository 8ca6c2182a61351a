"""Wake-ups for WatchJob: one LISTEN connection for the whole process, fanned out in memory.

Store.apply() sends NOTIFY with the job id when it commits new events; every watcher of that
job is woken. Watchers read through :meth:`EventHub.shared`: the watchers woken by one
notification share one query (per kind of read), so a thousand watchers of a job cost the
database what one does. When the listener connection is lost it is reopened and every watcher
is woken once, so nothing committed meanwhile is missed.

A connection left half-open by a database failover still looks open (``is_closed()`` is
False) and delivers nothing: the listener pings it every ``keepalive_s`` with a timeout and
reopens it when the ping fails. Every watcher is also woken every ``keepalive_s``, so a
notification lost anyway delays a stream by that much, never stalls it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, TypeVar

import asyncpg

from scheduler.store import NOTIFY_CHANNEL, WEBHOOK_CHANNEL

log = logging.getLogger(__name__)
T = TypeVar("T")


class EventHub:
    def __init__(
        self, dsn: str, retry_max_s: float, application_name: str = "scheduler", keepalive_s: float = 15.0
    ) -> None:
        self._dsn = dsn
        self._application_name = application_name
        self._retry_max_s = retry_max_s
        self._keepalive_s = keepalive_s
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        # Per watched job: how many wake-ups so far, and the reads watchers share (key ->
        # (the wake-up count when the read started, the read)).
        self._wakeups: dict[str, int] = {}
        self._reads: dict[str, dict[Hashable, tuple[int, asyncio.Task[Any]]]] = {}
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # Called with the job id of each provider webhook any replica accepted (the follower's
        # wake); one lost while the listener reconnects only leaves that job to its next poll.
        self.on_webhook: Callable[[str], None] | None = None

    def subscribe(self, job_id: str) -> asyncio.Event:
        """An event set whenever the job has something new; subscribe before reading."""
        waiter = asyncio.Event()
        self._waiters[job_id].add(waiter)
        self._wakeups.setdefault(job_id, 0)
        return waiter

    def unsubscribe(self, job_id: str, waiter: asyncio.Event) -> None:
        waiters = self._waiters.get(job_id)
        if waiters is not None:
            waiters.discard(waiter)
            if not waiters:
                del self._waiters[job_id]
                del self._wakeups[job_id]
                self._reads.pop(job_id, None)

    def wakeups(self, job_id: str) -> int:
        """Wake-ups of the job's watchers so far: read it before clearing a waiter."""
        return self._wakeups.get(job_id, 0)

    async def shared(self, job_id: str, key: Hashable, seen: int, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, or the same read of another watcher of ``job_id`` started after wake-up
        ``seen``: whatever was committed before that wake-up's notification, it sees. ``key``
        names what is read (the same key, the same query)."""
        reads = self._reads.setdefault(job_id, {}) if job_id in self._wakeups else {}
        found = reads.get(key)
        if found is None or found[0] < seen or (found[1].done() and found[1].exception() is not None):
            task: asyncio.Task[T] = asyncio.ensure_future(read())
            # A watcher that leaves mid-read must not cancel the read for the others.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            found = (self.wakeups(job_id), task)
            reads[key] = found
        result: T = await asyncio.shield(found[1])
        return result

    def wake(self, job_id: str) -> None:
        if job_id in self._wakeups:
            self._wakeups[job_id] += 1
        for waiter in self._waiters.get(job_id, ()):
            waiter.set()

    def _wake_all(self) -> None:
        for job_id, waiters in self._waiters.items():
            self._wakeups[job_id] += 1
            for waiter in waiters:
                waiter.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        # asyncpg hands over the NOTIFY payload as text: the job id
        self.wake(str(payload))

    def _on_webhook(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if self.on_webhook is not None:
            self.on_webhook(str(payload))

    def _on_terminate(self, _conn: object) -> None:
        self._lost.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-hub-listener")

    async def _run(self) -> None:
        delay = 0.1
        while True:
            self._lost.clear()
            try:
                conn = await asyncpg.connect(
                    self._dsn, timeout=10, server_settings={"application_name": self._application_name}
                )
                conn.add_termination_listener(self._on_terminate)
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                await conn.add_listener(WEBHOOK_CHANNEL, self._on_webhook)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("listener cannot connect", extra={"error": str(exc)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._retry_max_s)
                continue
            delay = 0.1
            self._conn = conn
            self.connected.set()
            self._wake_all()
            await self._keep_alive(conn)
            self.connected.clear()
            self._conn = None
            log.warning("listener connection lost; reconnecting")
            conn.terminate()

    async def _keep_alive(self, conn: asyncpg.Connection) -> None:
        """Until the connection is lost: ping it, and wake every watcher, every keepalive_s."""
        while True:
            try:
                await asyncio.wait_for(self._lost.wait(), self._keepalive_s)
                return
            except TimeoutError:
                pass
            self._wake_all()
            try:
                await conn.fetchval("SELECT 1", timeout=self._keepalive_s)
            except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("listener connection does not answer", extra={"error": str(exc)})
                return

    def check(self) -> bool:
        """False when the listener connection is closed (the health loop asks)."""
        if self._conn is None or self._conn.is_closed():
            self._lost.set()
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        self._wake_all()

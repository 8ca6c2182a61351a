"""The WatchJob listener survives a connection that a database failover left half-open: it
still looks open (is_closed() is False) but delivers nothing. The hub's keepalive ping finds it,
a new LISTEN connection replaces it, and watchers are woken so no committed event is missed."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qs, urlsplit, urlunsplit

import asyncpg

from scheduler.notify import EventHub
from scheduler.store import NOTIFY_CHANNEL


class FreezableProxy:
    """TCP on loopback to the database; ``freeze`` stops every open connection forwarding (its
    sockets stay open, as after a failover), while new connections pass."""

    def __init__(self, database_url: str) -> None:
        self._target = urlsplit(database_url)
        self._frozen: list[asyncio.Event] = []
        self.opened = 0
        self.server: asyncio.Server | None = None

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        socket_dir = parse_qs(self._target.query).get("host", [""])[0]
        if socket_dir.startswith("/"):
            port = self._target.port or 5432
            return await asyncio.open_unix_connection(f"{socket_dir}/.s.PGSQL.{port}")
        return await asyncio.open_connection(self._target.hostname, self._target.port or 5432)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        up_reader, up_writer = await self._connect_upstream()

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # swallow: half-open from here on
                sink.write(data)
                await sink.drain()

        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        writer.close()
        up_writer.close()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        query = "&".join(p for p in self._target.query.split("&") if p and not p.startswith("host="))
        netloc = f"{self._target.username or ''}:{self._target.password or ''}@127.0.0.1:{port}"
        return urlunsplit((self._target.scheme, netloc, self._target.path, query, ""))

    def freeze(self) -> None:
        for frozen in self._frozen:
            frozen.set()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def _until(condition, timeout: float) -> None:  # type: ignore[no-untyped-def]
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_a_half_open_listener_is_replaced_and_watchers_woken(database_url: str) -> None:
    proxy = FreezableProxy(database_url)
    hub = EventHub(await proxy.start(), retry_max_s=1.0, keepalive_s=0.5)
    hub.start()
    notifier = await asyncpg.connect(database_url)
    try:
        await asyncio.wait_for(hub.connected.wait(), 10)
        waiter = hub.subscribe("job-1")
        await notifier.execute("SELECT pg_notify($1, 'job-1')", NOTIFY_CHANNEL)
        await asyncio.wait_for(waiter.wait(), 2)  # the live listener delivers

        proxy.freeze()
        waiter.clear()
        assert hub.check()  # the frozen connection still looks open
        await notifier.execute("SELECT pg_notify($1, 'job-1')", NOTIFY_CHANNEL)
        # The notification is lost on the frozen connection; the watcher is still woken.
        await asyncio.wait_for(waiter.wait(), 3)
        # The keepalive ping timed out and a new LISTEN connection was opened.
        await _until(lambda: proxy.opened >= 2 and hub.connected.is_set(), 10)

        waiter.clear()
        await notifier.execute("SELECT pg_notify($1, 'job-1')", NOTIFY_CHANNEL)
        await asyncio.wait_for(waiter.wait(), 2)
    finally:
        await notifier.close()
        await hub.close()
        await proxy.close()

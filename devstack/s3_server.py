"""An S3-protocol server on loopback for tests and benchmarks: moto's standalone server (the
same HTTP API, SigV4 checks, presigned URLs and conditional writes as S3), started in a thread on
a free port with one bucket. Stands in for the cloud object store as the RunPod fake stands in
for RunPod.

Fault injection: ``server.outage(seconds)`` makes every request answer 503 SlowDown (S3's
"reduce your request rate", which clients retry) until that many seconds have passed, as a
store that is briefly unavailable does."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from artifact_store import StoreSettings
from devstack.stack import free_port

ACCESS_KEY_ID = "test-access-key"
SECRET_ACCESS_KEY = "test-secret-key-not-for-production"
REGION = "us-east-1"


_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class Outage:
    """A WSGI wrapper that answers 503 while an outage lasts; counts the requests it refused."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._until = 0.0
        self.refused = 0

    def start(self, seconds: float) -> None:
        with self._lock:
            self._until = time.monotonic() + seconds

    def end(self) -> None:
        with self._lock:
            self._until = 0.0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with self._lock:
            down = time.monotonic() < self._until
            self.refused += down
        if not down:
            return self._app(environ, start_response)
        start_response(
            "503 Slow Down",
            [("Content-Type", "application/xml"), ("Content-Length", str(len(_SLOW_DOWN)))],
        )
        return [_SLOW_DOWN]


@dataclass(frozen=True)
class S3TestServer:
    endpoint_url: str
    bucket: str
    faults: Outage | None = field(default=None, compare=False)

    def outage(self, seconds: float = math.inf) -> None:
        """Answer every request with 503 for the next ``seconds`` (by default until
        ``end_outage``: a test that ends it after what it waits for has happened is not at the
        mercy of a loaded machine's timing)."""
        if self.faults is None:
            raise RuntimeError("this S3 test server was started without fault injection")
        self.faults.start(seconds)

    def end_outage(self) -> None:
        if self.faults is None:
            raise RuntimeError("this S3 test server was started without fault injection")
        self.faults.end()

    def store_settings(self, prefix: str = "artifacts") -> StoreSettings:
        """Settings of an artifact store under ``prefix`` in this server's bucket."""
        return StoreSettings(
            url=f"s3://{self.bucket}/{prefix}",
            endpoint_url=self.endpoint_url,
            region=REGION,
            access_key_id=SecretStr(ACCESS_KEY_ID),
            secret_access_key=SecretStr(SECRET_ACCESS_KEY),
        )

    def store_env(self, prefix: str = "artifacts") -> dict[str, str]:
        """ARTIFACT_STORE_* variables that point a service at this server."""
        return {
            "ARTIFACT_STORE_URL": f"s3://{self.bucket}/{prefix}",
            "ARTIFACT_STORE_ENDPOINT_URL": self.endpoint_url,
            "ARTIFACT_STORE_REGION": REGION,
            "ARTIFACT_STORE_ACCESS_KEY_ID": ACCESS_KEY_ID,
            "ARTIFACT_STORE_SECRET_ACCESS_KEY": SECRET_ACCESS_KEY,
        }


@contextmanager
def s3_test_server(bucket: str = "influence-artifacts") -> Iterator[S3TestServer]:
    import boto3
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    faults = Outage(DomainDispatcherApplication(create_backend_app))

    class FaultyMotoServer(ThreadedMotoServer):
        """moto's threaded server, its WSGI app behind the outage switch."""

        def _server_entry(self) -> None:
            self._server = make_server(
                self._ip_address, self._port, faults, True, request_handler=MotoRequestHandler
            )
            self._server_ready_event.set()
            self._server.serve_forever()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = FaultyMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY_ID,
            aws_secret_access_key=SECRET_ACCESS_KEY,
        ).create_bucket(Bucket=bucket)
        yield S3TestServer(endpoint_url=endpoint, bucket=bucket, faults=faults)
    finally:
        server.stop()

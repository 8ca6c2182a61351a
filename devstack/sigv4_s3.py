"""An S3 server that checks signatures, on loopback, for tests of what a signed URL binds.

moto (devstack.s3_server) does not check presigned URLs' signatures: a request that drops a
signed header still passes there. s3rver (npm ``@20minutes/s3rver``, installed by ``make setup``
into devstack/s3rver) checks SigV4, header and query-string forms, signed headers included, but
implements no conditional writes; the two servers together cover what S3 does with an upload
URL. ``sigv4_s3_server`` yields None where node or the package is missing."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from artifact_store import StoreSettings
from devstack.stack import free_port

PACKAGE_DIR = Path(__file__).parent / "s3rver"
# s3rver's one built-in account.
ACCESS_KEY_ID = SECRET_ACCESS_KEY = "S3RVER"
_READY_TIMEOUT_S = 30


@dataclass(frozen=True)
class SigV4TestServer:
    endpoint_url: str
    bucket: str

    def store_settings(self, prefix: str = "artifacts") -> StoreSettings:
        return StoreSettings(
            url=f"s3://{self.bucket}/{prefix}",
            endpoint_url=self.endpoint_url,
            access_key_id=SecretStr(ACCESS_KEY_ID),
            secret_access_key=SecretStr(SECRET_ACCESS_KEY),
        )


def available() -> bool:
    return shutil.which("node") is not None and (PACKAGE_DIR / "node_modules" / "@20minutes").is_dir()


@contextmanager
def sigv4_s3_server(bucket: str = "influence-artifacts") -> Iterator[SigV4TestServer | None]:
    if not available():
        yield None
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="s3rver-") as data:
        process = subprocess.Popen(
            ["node", "serve.js", str(port), data, bucket],
            cwd=PACKAGE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()  # "ready", or the error it died with
            if line.strip() != "ready":
                raise RuntimeError(f"s3rver did not start: {line.strip()}")
            yield SigV4TestServer(endpoint_url=f"http://127.0.0.1:{port}", bucket=bucket)
        finally:
            process.terminate()
            process.wait(timeout=_READY_TIMEOUT_S)

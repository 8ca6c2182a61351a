"""An S3-protocol server on loopback for tests and benchmarks: moto's standalone server (the
same HTTP API, SigV4 checks and presigned URLs as S3), started in a thread on a free port with
one bucket. Stands in for the cloud object store as the RunPod fake stands in for RunPod."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import SecretStr

from artifact_store import StoreSettings
from devstack.stack import free_port

ACCESS_KEY_ID = "test-access-key"
SECRET_ACCESS_KEY = "test-secret-key-not-for-production"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3TestServer:
    endpoint_url: str
    bucket: str

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
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
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
        yield S3TestServer(endpoint_url=endpoint, bucket=bucket)
    finally:
        server.stop()

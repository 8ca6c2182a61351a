"""What the e2e tests of remote workers read back: an object of the S3 test server, and an
artifact through the gateway's 307 to a presigned GET."""

from __future__ import annotations

import httpx

from devstack.client import GatewayClient
from devstack.s3_server import S3TestServer


def store_object(s3_server: S3TestServer, prefix: str, key: str) -> bytes:
    """The bytes at ``key`` under the store's ``prefix``, read with the server's own keys."""
    import boto3

    from devstack.s3_server import ACCESS_KEY_ID, REGION, SECRET_ACCESS_KEY

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
    return client.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/{key}")["Body"].read()


def download(client: GatewayClient, job_id: str, name: str) -> bytes:
    """The gateway's artifact route: a 307 to a presigned GET of the S3 store, followed."""
    reply = client.request("GET", f"/api/jobs/{job_id}/artifacts/{name}")
    assert reply.status_code == 307, reply.text
    fetched = httpx.get(reply.headers["location"], timeout=60)
    assert fetched.status_code == 200
    return fetched.content

"""Bearer-token checks: HS256 shared secret, JWKS (RS256) from a local HTTP server, local sign-in."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.config import Settings
from service_runtime.settings import SettingsError

ISSUER = "https://auth.example.test/auth/v1"
AUDIENCE = "authenticated"
SECRET = "a-shared-hs256-secret-of-more-than-32-chars"


def token(
    key: Any = SECRET, algorithm: str = "HS256", headers: dict[str, str] | None = None, **claims: Any
) -> str:
    body = {"sub": "user-1", "iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600, **claims}
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


def bearer(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


async def test_missing_token_is_401_with_a_message(gateway) -> None:
    response = await gateway.client.get("/api/jobs")
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


async def test_non_bearer_scheme_and_garbage_token_are_401(gateway) -> None:
    basic = await gateway.client.get("/api/jobs", headers={"Authorization": "Basic dTpw"})
    assert basic.status_code == 401 and "Bearer <token>" in basic.json()["detail"]
    garbage = await gateway.client.get("/api/jobs", headers=bearer("not-a-jwt"))
    assert garbage.status_code == 401 and "well-formed" in garbage.json()["detail"]


async def test_hs256_shared_secret(make_gateway) -> None:
    gateway = await make_gateway(auth_mode="jwt", jwt_secret=SECRET, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    good = await gateway.client.get("/api/jobs", headers=bearer(token()))
    assert good.status_code == 200, good.text

    cases = {
        "signature": token(key="another-secret-that-is-also-long-enough!"),
        "audience": token(aud="someone-else"),
        "issuer": token(iss="https://evil.example.test"),
        "expired": token(exp=int(time.time()) - 3600),
    }
    for reason, value in cases.items():
        response = await gateway.client.get("/api/jobs", headers=bearer(value))
        assert response.status_code == 401, reason
        assert reason.rstrip("d") in response.json()["detail"].lower(), response.json()


async def test_jwt_mode_has_no_local_sign_in(make_gateway) -> None:
    gateway = await make_gateway(auth_mode="jwt", jwt_secret=SECRET, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    response = await gateway.client.post("/api/auth/local", json={"username": "alice"})
    assert response.status_code == 404
    # A locally signed token from some other gateway is not accepted either.
    forged = token(key="local-secret-of-some-other-gateway-xxxxxx", iss="influence-dashboard-local")
    assert (await gateway.client.get("/api/jobs", headers=bearer(forged))).status_code == 401


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, rsa.RSAPrivateKey]]:
    """A JWKS document served over real HTTP on loopback, for a freshly generated RSA key."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    document = json.dumps({"keys": [{**jwk, "kid": "test-key", "use": "sig", "alg": "RS256"}]}).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/.well-known/jwks.json", private_key
    server.shutdown()
    server.server_close()
    thread.join()


async def test_rs256_from_jwks(make_gateway, jwks_server) -> None:
    url, private_key = jwks_server
    gateway = await make_gateway(auth_mode="jwt", jwt_jwks_url=url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    good = token(key=private_key, algorithm="RS256", headers={"kid": "test-key"})
    assert (await gateway.client.get("/api/jobs", headers=bearer(good))).status_code == 200

    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = token(key=other_key, algorithm="RS256", headers={"kid": "test-key"})
    response = await gateway.client.get("/api/jobs", headers=bearer(forged))
    assert response.status_code == 401 and "signature" in response.json()["detail"]

    unknown_kid = token(key=private_key, algorithm="RS256", headers={"kid": "rotated-away"})
    response = await gateway.client.get("/api/jobs", headers=bearer(unknown_kid))
    assert response.status_code == 401 and "signing key" in response.json()["detail"]

    wrong_audience = token(key=private_key, algorithm="RS256", headers={"kid": "test-key"}, aud="x")
    assert (await gateway.client.get("/api/jobs", headers=bearer(wrong_audience))).status_code == 401

    # No shared secret is configured: an HS256 token is refused whatever it claims.
    assert (await gateway.client.get("/api/jobs", headers=bearer(token()))).status_code == 401


async def test_local_sign_in_gives_a_working_token(gateway, upstream) -> None:
    response = await gateway.client.post("/api/auth/local", json={"username": "alice"})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "local:alice"

    submitted = await gateway.client.post(
        "/api/train",
        headers=bearer(body["access_token"]),
        json={
            "training_data": [{"prompt": "p", "completion": "c"}],
            "eval_data": [{"prompt": "p", "expected": "c"}],
        },
    )
    assert submitted.status_code == 202
    assert upstream.scheduler.submit_requests[-1].user_id == "local:alice"


async def test_local_sign_in_rejects_a_bad_username(gateway) -> None:
    response = await gateway.client.post("/api/auth/local", json={"username": "no spaces please"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "username"


async def test_an_unreachable_identity_provider_is_a_503_naming_it(make_gateway) -> None:
    # A port nothing listens on: the JWKS fetch fails, which is not the caller's fault.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    gateway = await make_gateway(auth_mode="jwt", jwt_jwks_url=url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed = token(key=private_key, algorithm="RS256", headers={"kid": "test-key"})
    response = await gateway.client.get("/api/jobs", headers=bearer(signed))
    assert response.status_code == 503
    assert f"identity provider (127.0.0.1:{port})" in response.json()["detail"]


def _start_gateway_process(**env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "AUTH_MODE", "JWT_"))}
    return subprocess.run(
        [sys.executable, "-m", "gateway"],
        env={**base, "GATEWAY_PORT": "0", "LOG_LEVEL": "INFO", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_local_sign_in_on_a_public_address_refuses_to_start() -> None:
    done = _start_gateway_process(GATEWAY_HOST="0.0.0.0", AUTH_MODE="local")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    record = json.loads(line)
    assert record["level"].lower() == "error"
    assert (
        "AUTH_MODE=local" in record["message"] and "GATEWAY_ALLOW_INSECURE_LOCAL_SIGN_IN" in record["message"]
    )


def test_local_sign_in_on_loopback_or_with_the_insecure_flag_is_allowed() -> None:
    assert Settings.load(gateway_host="127.0.0.1", auth_mode="local").auth_mode == "local"
    flagged = Settings.load(
        gateway_host="0.0.0.0", auth_mode="local", gateway_allow_insecure_local_sign_in=True
    )
    assert flagged.gateway_host == "0.0.0.0"
    with pytest.raises(SettingsError, match="GATEWAY_ALLOW_INSECURE_LOCAL_SIGN_IN"):
        Settings.load(gateway_host="0.0.0.0", auth_mode="local")

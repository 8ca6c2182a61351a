"""SigV4 query-string signing of S3 URLs that bind request headers.

obstore signs a URL for the method and key only, so its holder may send any headers. A direct
upload must carry ``If-None-Match: *`` (S3's conditional create: the store refuses to write over
an existing object) and, where its size is known when the URL is signed, ``Content-Length`` of
that size (and ``x-amz-checksum-sha256``); a header is only binding when it is one of the URL's
signed headers: S3 then refuses a request that drops or changes it (SignatureDoesNotMatch), so a
body of another size is refused. This signs obstore's URL again with those headers (AWS
Signature Version 4, query parameters, UNSIGNED-PAYLOAD)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import quote, unquote, urlsplit

_ALGORITHM = "AWS4-HMAC-SHA256"


def _uri_encode(value: str, safe: str = "-_.~") -> str:
    return quote(value, safe=safe)


def _hmac(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def sign_url(
    url: str,
    method: str,
    *,
    access_key_id: str,
    secret_access_key: str,
    region: str,
    expires_s: int,
    headers: Mapping[str, str],
    now: datetime,
) -> str:
    """``url`` (scheme, host and path of an S3 object; any query is dropped) signed for
    ``method`` with ``host`` and ``headers`` as its signed headers, valid ``expires_s`` from
    ``now`` (UTC)."""
    parts = urlsplit(url)
    # S3's canonical path: each segment URI-encoded once, "/" kept.
    path = _uri_encode(unquote(parts.path or "/"), safe="/-_.~")
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    signed = {"host": parts.netloc, **{name.lower(): value.strip() for name, value in headers.items()}}
    names = sorted(signed)
    query = {
        "X-Amz-Algorithm": _ALGORITHM,
        "X-Amz-Credential": f"{access_key_id}/{scope}",
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires_s),
        "X-Amz-SignedHeaders": ";".join(names),
    }
    canonical_query = "&".join(f"{_uri_encode(k)}={_uri_encode(v)}" for k, v in sorted(query.items()))
    canonical_request = "\n".join(
        [
            method,
            path,
            canonical_query,
            "".join(f"{name}:{signed[name]}\n" for name in names),
            ";".join(names),
            "UNSIGNED-PAYLOAD",
        ]
    )
    string_to_sign = "\n".join(
        [_ALGORITHM, amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = ("AWS4" + secret_access_key).encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    return f"{parts.scheme}://{parts.netloc}{path}?{canonical_query}&X-Amz-Signature={signature}"

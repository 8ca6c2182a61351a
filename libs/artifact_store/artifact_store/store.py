"""The artifact store: put from a stream of chunks, get as a stream, stat, list, delete (one key or
a prefix), presigned PUT/GET URLs. One implementation over obstore for both backends:

- a local directory (the embedded default, ``.data/artifacts``), obstore's LocalStore;
- any S3-compatible bucket (``s3://bucket/prefix``: S3, R2, GCS's S3 API, MinIO), obstore's S3Store.

Why obstore and not fsspec: measured in docs/artifacts.md (benchmarks/store_library_choice.py),
obstore streams a 256 MiB object from S3 8x faster with a third of the memory, signs PUT URLs
itself (s3fs signs only GETs), and needs no aiobotocore, whose botocore pin conflicts with the
boto3 that the runpod SDK requires.

A put is atomic: the object becomes visible only once every chunk arrived and its checksum matched
(LocalStore writes a staged file and renames it; S3 completes a multipart upload). A put that fails
mid-stream, or whose sha256 is not the expected one, raises and leaves nothing listed.

Keys are per job: ``jobs/{job_id}/{name}``, ``name`` a relative POSIX path (``scores.npy``,
``adapter/adapter_config.json``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import obstore
from obstore.exceptions import BaseError, NotFoundError
from obstore.store import LocalStore, S3Store

from artifact_store.config import StoreSettings
from artifact_store.sigv4 import sign_url

if TYPE_CHECKING:
    from obstore.store import ClientConfig  # declared in obstore's stubs only

# Bytes per chunk when reading and when streaming between services (well under gRPC's 4 MiB).
CHUNK_BYTES = 1024 * 1024
# Upload part size: S3 refuses parts under 5 MiB (all but the last).
_PART_BYTES = 8 * 1024 * 1024
# Parts in flight per upload: bounds a put's memory to about _PART_BYTES x this.
_UPLOAD_CONCURRENCY = 4
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+=@-]{0,199}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_NAME_CHARS = 512


class StoreError(Exception):
    """The artifact store failed; the message says so in plain words (never a credential)."""


class ArtifactNotFound(StoreError):
    """No object under that key."""


class InvalidArtifactName(ValueError):
    """An artifact name that is not a safe relative POSIX path."""


class ChecksumMismatch(StoreError):
    """The streamed bytes did not have the expected sha256 or size; nothing was stored."""


class PresignNotSupported(StoreError):
    """The local filesystem store cannot mint presigned URLs (or, without keys, ones that bind
    headers)."""


@dataclass(frozen=True)
class SigningKeys:
    """The store's own keys, for URLs that bind headers (``ArtifactStore.presigned_url``)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    region: str


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    bytes: int
    last_modified: datetime


@dataclass(frozen=True)
class PutResult:
    key: str
    bytes: int
    sha256: str


def check_artifact_name(name: str) -> str:
    """``name`` when it is a relative POSIX path of safe segments, else InvalidArtifactName."""
    if not name or len(name) > _MAX_NAME_CHARS:
        raise InvalidArtifactName(f"artifact name must be 1-{_MAX_NAME_CHARS} characters")
    for segment in name.split("/"):
        if not _SEGMENT.fullmatch(segment):
            raise InvalidArtifactName(
                f"artifact name {name!r} is not a relative path of segments of letters, digits and ._+=@-"
            )
    return name


def job_prefix(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise InvalidArtifactName(f"job id {job_id!r} cannot name a store prefix")
    return f"jobs/{job_id}/"


def job_key(job_id: str, name: str) -> str:
    return job_prefix(job_id) + check_artifact_name(name)


# obstore raises its own errors, and builtin ones for some (FileNotFoundError for a missing object).
_ERRORS = (BaseError, OSError)
_NOT_FOUND = (NotFoundError, FileNotFoundError)


def _failed(action: str, key: str, exc: Exception) -> StoreError:
    if isinstance(exc, ChecksumMismatch):
        return exc
    if isinstance(exc, _NOT_FOUND):
        return ArtifactNotFound(f"no artifact {key!r} in the artifact store")
    # obstore's messages name the operation and path; requests carry credentials only in headers.
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return StoreError(f"the artifact store failed to {action} {key!r}: {detail}")


class ArtifactStore:
    """Async operations on one store. ``kind`` is "local" or "s3"."""

    def __init__(
        self,
        store: LocalStore | S3Store,
        kind: Literal["local", "s3"],
        presign_expiry_s: int,
        root: Path | None = None,
        signing_keys: SigningKeys | None = None,
    ) -> None:
        self._store = store
        self.kind = kind
        self._presign_expiry = timedelta(seconds=presign_expiry_s)
        self._root = root  # the local store's directory
        self._signing_keys = signing_keys

    def local_path(self, key: str) -> Path:
        """Where a key's object lies on this host (the local store only): a reader on the same host
        (compute-local) opens it there, as a presigned GET would serve it."""
        if self._root is None:
            raise PresignNotSupported("an S3 store has no local paths; presign a GET instead")
        return self._root / key

    @property
    def supports_presign(self) -> bool:
        return self.kind == "s3"

    @property
    def signs_headers(self) -> bool:
        """Whether ``presigned_url`` can bind headers (an S3 store with its keys in the settings)."""
        return self.supports_presign and self._signing_keys is not None

    async def put(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        expected_sha256: str | None = None,
        expected_bytes: int | None = None,
    ) -> PutResult:
        """Store the chunks under ``key``, hashing them as they pass. With ``expected_*`` set,
        a mismatch aborts the upload before it is committed."""
        digest = hashlib.sha256()
        size = 0

        async def hashed() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                yield chunk
            # Raised inside the upload, so obstore aborts it and nothing becomes visible.
            if expected_bytes is not None and size != expected_bytes:
                raise ChecksumMismatch(f"{key!r} arrived with {size} bytes, expected {expected_bytes}")
            if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
                raise ChecksumMismatch(
                    f"{key!r} arrived with sha256 {digest.hexdigest()}, expected {expected_sha256}"
                )

        try:
            await obstore.put_async(
                self._store,
                key,
                hashed(),
                chunk_size=_PART_BYTES,
                max_concurrency=_UPLOAD_CONCURRENCY,
                use_multipart=True,
            )
        except _ERRORS as exc:
            raise _failed("store", key, exc) from None
        return PutResult(key=key, bytes=size, sha256=digest.hexdigest())

    async def get(self, key: str, chunk_bytes: int = CHUNK_BYTES) -> AsyncIterator[bytes]:
        """The object's bytes in chunks of about ``chunk_bytes``; ArtifactNotFound before the
        first chunk when it does not exist."""
        try:
            result = await obstore.get_async(self._store, key)
        except _ERRORS as exc:
            raise _failed("read", key, exc) from None
        return self._chunks(key, result.stream(min_chunk_size=chunk_bytes))

    @staticmethod
    async def _chunks(key: str, stream: Any) -> AsyncIterator[bytes]:
        try:
            async for chunk in stream:
                yield bytes(chunk)
        except _ERRORS as exc:
            raise _failed("read", key, exc) from None

    async def stat(self, key: str) -> ObjectInfo:
        try:
            meta = await obstore.head_async(self._store, key)
        except _ERRORS as exc:
            raise _failed("find", key, exc) from None
        return _info(meta)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (a folder-like prefix ending in "/")."""
        found: list[ObjectInfo] = []
        try:
            async for batch in obstore.list(self._store, prefix.rstrip("/") or None):
                found.extend(_info(meta) for meta in batch)
        except _ERRORS as exc:
            raise _failed("list", prefix, exc) from None
        found.sort(key=lambda info: info.key)
        return found

    async def copy(self, source: str, target: str) -> None:
        """Copy the object ``source`` to ``target`` inside the store (S3 CopyObject, a file copy
        on the local store): no byte passes through this process. ``target`` is replaced."""
        try:
            await obstore.copy_async(self._store, source, target, overwrite=True)
        except _ERRORS as exc:
            raise _failed("copy", source, exc) from None

    async def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        await self._delete(key, key)

    async def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; returns how many there were."""
        keys = [info.key for info in await self.list(prefix)]
        if keys:
            await self._delete(keys, prefix)
        return len(keys)

    async def _delete(self, keys: str | Sequence[str], what: str) -> None:
        """Delete ``keys`` (one or many); a missing one is not an error, any other failure is
        raised naming ``what`` (the key, or the prefix the keys were listed under)."""
        try:
            await obstore.delete_async(self._store, keys)
        except _NOT_FOUND:
            return
        except _ERRORS as exc:
            raise _failed("delete", what, exc) from None

    async def presigned_url(
        self,
        method: Literal["GET", "PUT"],
        key: str,
        expires_s: int | None = None,
        signed_headers: Mapping[str, str] | None = None,
    ) -> str:
        """A URL that lets its holder GET or PUT exactly ``key`` until it expires. With
        ``signed_headers`` the request must carry each of them with that value, or the store
        refuses it (they are signed: ``artifact_store.sigv4``); this needs the store's keys in
        the settings (a URL signed with instance credentials cannot bind headers here)."""
        if not isinstance(self._store, S3Store):
            raise PresignNotSupported("the local artifact store cannot mint presigned URLs")
        expires = timedelta(seconds=expires_s) if expires_s else self._presign_expiry
        try:
            url = await obstore.sign_async(self._store, method, key, expires)
        except _ERRORS as exc:
            raise _failed("sign a URL for", key, exc) from None
        if not signed_headers:
            return url
        if self._signing_keys is None:
            raise PresignNotSupported(
                "URLs that bind headers need ARTIFACT_STORE_ACCESS_KEY_ID and "
                "ARTIFACT_STORE_SECRET_ACCESS_KEY"
            )
        return sign_url(
            url,
            method,
            access_key_id=self._signing_keys.access_key_id,
            secret_access_key=self._signing_keys.secret_access_key,
            region=self._signing_keys.region,
            expires_s=int(expires.total_seconds()),
            headers=signed_headers,
            now=datetime.now(UTC),
        )


def _info(meta: Any) -> ObjectInfo:
    modified = meta.get("last_modified") or datetime.fromtimestamp(0, UTC)
    return ObjectInfo(key=str(meta["path"]), bytes=int(meta["size"]), last_modified=modified)


def open_store(settings: StoreSettings) -> ArtifactStore:
    """The store ``settings.url`` names; a relative directory is taken from the working directory."""
    if settings.is_s3:
        options: dict[str, Any] = {"region": settings.region}
        if settings.endpoint_url:
            options["endpoint"] = settings.endpoint_url
        if settings.access_key_id.get_secret_value():
            options["access_key_id"] = settings.access_key_id.get_secret_value()
            options["secret_access_key"] = settings.secret_access_key.get_secret_value()
        client_options: ClientConfig | None = (
            {"allow_http": True} if settings.endpoint_url.startswith("http://") else None
        )
        store = S3Store.from_url(settings.url, client_options=client_options, **options)
        keys = (
            SigningKeys(
                settings.access_key_id.get_secret_value(),
                settings.secret_access_key.get_secret_value(),
                settings.region,
            )
            if settings.access_key_id.get_secret_value()
            else None
        )
        return ArtifactStore(store, "s3", settings.presign_expiry_s, signing_keys=keys)
    root = Path(settings.url.removeprefix("file://")).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return ArtifactStore(LocalStore(root), "local", settings.presign_expiry_s, root=root)

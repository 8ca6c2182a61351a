"""One small interface over the artifact store; see ``artifact_store.store``."""

from artifact_store.config import StoreSettings, load_store_settings
from artifact_store.store import (
    CHUNK_BYTES,
    ArtifactNotFound,
    ArtifactStore,
    ChecksumMismatch,
    InvalidArtifactName,
    ObjectInfo,
    PresignNotSupported,
    PutResult,
    SigningKeys,
    StoreError,
    check_artifact_name,
    job_key,
    job_prefix,
    open_store,
)

__all__ = [
    "CHUNK_BYTES",
    "ArtifactNotFound",
    "ArtifactStore",
    "ChecksumMismatch",
    "InvalidArtifactName",
    "ObjectInfo",
    "PresignNotSupported",
    "PutResult",
    "SigningKeys",
    "StoreError",
    "StoreSettings",
    "check_artifact_name",
    "job_key",
    "job_prefix",
    "load_store_settings",
    "open_store",
]

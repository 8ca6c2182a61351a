"""Store settings from ARTIFACT_STORE_* environment variables. Keys are secrets: never logged."""

from __future__ import annotations

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_STORE_URL = ".data/artifacts"


class StoreSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARTIFACT_STORE_", case_sensitive=False, extra="ignore")

    # A local directory (the embedded default) or s3://bucket/prefix for any S3-compatible store.
    url: str = DEFAULT_STORE_URL
    # S3 only: the endpoint of a non-AWS store (R2, MinIO, GCS's S3 API); empty means AWS.
    endpoint_url: str = ""
    region: str = "us-east-1"
    access_key_id: SecretStr = SecretStr("")
    secret_access_key: SecretStr = SecretStr("")
    # Lifetime of presigned PUT/GET URLs.
    presign_expiry_s: int = Field(default=900, ge=60, le=7 * 24 * 3600)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("is empty; use a directory or s3://bucket/prefix")
        if "://" in value and not value.startswith(("s3://", "file://")):
            raise ValueError(
                f"{value.split('://')[0]}:// is not supported; use a directory or s3://bucket/prefix"
            )
        if value.startswith("s3://") and not value.removeprefix("s3://").strip("/"):
            raise ValueError("s3:// needs a bucket: s3://bucket/prefix")
        return value

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s):// URL, got {value!r}")
        return value

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


def load_store_settings(**overrides: object) -> StoreSettings:
    """Settings from the environment plus ``overrides``; a bad value raises ValueError naming
    the variable (never its value: it may be a key)."""
    try:
        return StoreSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = f"ARTIFACT_STORE_{str(error['loc'][0]).upper()}" if error["loc"] else "ARTIFACT_STORE"
            problems.append(f"{name}: {str(error['msg']).removeprefix('Value error, ')}")
        raise ValueError("invalid artifact store settings: " + "; ".join(problems)) from None

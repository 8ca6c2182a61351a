import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_SUBMITTED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class KeyFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_FAILURE_UNSPECIFIED: _ClassVar[KeyFailure]
    KEY_FAILURE_INVALID: _ClassVar[KeyFailure]
    KEY_FAILURE_NO_FUNDS: _ClassVar[KeyFailure]
    KEY_FAILURE_NO_PERMISSION: _ClassVar[KeyFailure]
    KEY_FAILURE_UNREACHABLE: _ClassVar[KeyFailure]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_SUBMITTED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
KEY_FAILURE_UNSPECIFIED: KeyFailure
KEY_FAILURE_INVALID: KeyFailure
KEY_FAILURE_NO_FUNDS: KeyFailure
KEY_FAILURE_NO_PERMISSION: KeyFailure
KEY_FAILURE_UNREACHABLE: KeyFailure

class Account(_message.Message):
    __slots__ = ("user_id", "endpoint_id", "hosted")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTED_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    endpoint_id: str
    hosted: bool
    def __init__(self, user_id: _Optional[str] = ..., endpoint_id: _Optional[str] = ..., hosted: bool = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("seq", "type", "stage", "progress", "message", "event_json", "time")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    EVENT_JSON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    seq: int
    type: str
    stage: str
    progress: float
    message: str
    event_json: bytes
    time: _timestamp_pb2.Timestamp
    def __init__(self, seq: _Optional[int] = ..., type: _Optional[str] = ..., stage: _Optional[str] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., event_json: _Optional[bytes] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Estimate(_message.Message):
    __slots__ = ("backend", "provider", "gpu", "gpu_memory_gb", "required_memory_gb", "estimated_time_s", "usd_per_second", "estimated_cost_usd", "prices_as_of", "price_source", "notes", "gpu_seconds", "shards", "parallel_jobs")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TIME_S_FIELD_NUMBER: _ClassVar[int]
    USD_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    PRICES_AS_OF_FIELD_NUMBER: _ClassVar[int]
    PRICE_SOURCE_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_JOBS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    provider: str
    gpu: str
    gpu_memory_gb: float
    required_memory_gb: float
    estimated_time_s: float
    usd_per_second: float
    estimated_cost_usd: float
    prices_as_of: str
    price_source: str
    notes: _containers.RepeatedScalarFieldContainer[str]
    gpu_seconds: float
    shards: int
    parallel_jobs: int
    def __init__(self, backend: _Optional[str] = ..., provider: _Optional[str] = ..., gpu: _Optional[str] = ..., gpu_memory_gb: _Optional[float] = ..., required_memory_gb: _Optional[float] = ..., estimated_time_s: _Optional[float] = ..., usd_per_second: _Optional[float] = ..., estimated_cost_usd: _Optional[float] = ..., prices_as_of: _Optional[str] = ..., price_source: _Optional[str] = ..., notes: _Optional[_Iterable[str]] = ..., gpu_seconds: _Optional[float] = ..., shards: _Optional[int] = ..., parallel_jobs: _Optional[int] = ...) -> None: ...

class JobUsage(_message.Message):
    __slots__ = ("gpu_seconds", "delay_seconds", "gpu", "source")
    GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    gpu_seconds: float
    delay_seconds: float
    gpu: str
    source: str
    def __init__(self, gpu_seconds: _Optional[float] = ..., delay_seconds: _Optional[float] = ..., gpu: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class JobCost(_message.Message):
    __slots__ = ("gpu_seconds", "delay_seconds", "gpu", "device", "usd_per_second", "cost_usd", "source")
    GPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DELAY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    USD_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    COST_USD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    gpu_seconds: float
    delay_seconds: float
    gpu: str
    device: str
    usd_per_second: float
    cost_usd: float
    source: str
    def __init__(self, gpu_seconds: _Optional[float] = ..., delay_seconds: _Optional[float] = ..., gpu: _Optional[str] = ..., device: _Optional[str] = ..., usd_per_second: _Optional[float] = ..., cost_usd: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("name", "bytes", "sha256", "media_type")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    bytes: int
    sha256: str
    media_type: str
    def __init__(self, name: _Optional[str] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., media_type: _Optional[str] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class EndpointInfo(_message.Message):
    __slots__ = ("byok_available", "unavailable_reason", "state", "endpoint_id", "name", "gpu_pools", "workers_max", "workers", "execution_timeout_s", "console_url")
    BYOK_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    UNAVAILABLE_REASON_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    GPU_POOLS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_MAX_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_URL_FIELD_NUMBER: _ClassVar[int]
    byok_available: bool
    unavailable_reason: str
    state: str
    endpoint_id: str
    name: str
    gpu_pools: _containers.RepeatedScalarFieldContainer[str]
    workers_max: int
    workers: EndpointWorkers
    execution_timeout_s: int
    console_url: str
    def __init__(self, byok_available: bool = ..., unavailable_reason: _Optional[str] = ..., state: _Optional[str] = ..., endpoint_id: _Optional[str] = ..., name: _Optional[str] = ..., gpu_pools: _Optional[_Iterable[str]] = ..., workers_max: _Optional[int] = ..., workers: _Optional[_Union[EndpointWorkers, _Mapping]] = ..., execution_timeout_s: _Optional[int] = ..., console_url: _Optional[str] = ...) -> None: ...

class EndpointWorkers(_message.Message):
    __slots__ = ("running", "idle", "initializing", "throttled", "unhealthy", "total")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    IDLE_FIELD_NUMBER: _ClassVar[int]
    INITIALIZING_FIELD_NUMBER: _ClassVar[int]
    THROTTLED_FIELD_NUMBER: _ClassVar[int]
    UNHEALTHY_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    running: int
    idle: int
    initializing: int
    throttled: int
    unhealthy: int
    total: int
    def __init__(self, running: _Optional[int] = ..., idle: _Optional[int] = ..., initializing: _Optional[int] = ..., throttled: _Optional[int] = ..., unhealthy: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

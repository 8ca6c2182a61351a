from influence.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndpointRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: _common_pb2.Account
    def __init__(self, account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ...) -> None: ...

class VerifyCredentialsRequest(_message.Message):
    __slots__ = ("account", "api_key")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    account: _common_pb2.Account
    api_key: str
    def __init__(self, account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ..., api_key: _Optional[str] = ...) -> None: ...

class VerifyCredentialsResponse(_message.Message):
    __slots__ = ("valid", "account_id", "balance_usd", "message", "failure")
    VALID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_USD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    account_id: str
    balance_usd: float
    message: str
    failure: _common_pb2.KeyFailure
    def __init__(self, valid: bool = ..., account_id: _Optional[str] = ..., balance_usd: _Optional[float] = ..., message: _Optional[str] = ..., failure: _Optional[_Union[_common_pb2.KeyFailure, str]] = ...) -> None: ...

class PrepareAccountRequest(_message.Message):
    __slots__ = ("account", "model_params_b", "quantization", "model_id", "runpod_gpu")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_PARAMS_B_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    RUNPOD_GPU_FIELD_NUMBER: _ClassVar[int]
    account: _common_pb2.Account
    model_params_b: float
    quantization: str
    model_id: str
    runpod_gpu: str
    def __init__(self, account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ..., model_params_b: _Optional[float] = ..., quantization: _Optional[str] = ..., model_id: _Optional[str] = ..., runpod_gpu: _Optional[str] = ...) -> None: ...

class PrepareAccountResponse(_message.Message):
    __slots__ = ("endpoint_id", "created", "status")
    ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    endpoint_id: str
    created: bool
    status: str
    def __init__(self, endpoint_id: _Optional[str] = ..., created: bool = ..., status: _Optional[str] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("job_id", "account", "spec_json", "estimated_cost_usd", "estimated_time_s", "kind", "request_json", "parent_result_json", "artifact_uploads", "parent_job_id", "parent_artifacts", "datasets", "webhook_url")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TIME_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    PARENT_RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_UPLOADS_FIELD_NUMBER: _ClassVar[int]
    PARENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    WEBHOOK_URL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    account: _common_pb2.Account
    spec_json: bytes
    estimated_cost_usd: float
    estimated_time_s: float
    kind: str
    request_json: bytes
    parent_result_json: bytes
    artifact_uploads: _containers.RepeatedCompositeFieldContainer[ArtifactUpload]
    parent_job_id: str
    parent_artifacts: _containers.RepeatedCompositeFieldContainer[ParentArtifact]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetFile]
    webhook_url: str
    def __init__(self, job_id: _Optional[str] = ..., account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ..., spec_json: _Optional[bytes] = ..., estimated_cost_usd: _Optional[float] = ..., estimated_time_s: _Optional[float] = ..., kind: _Optional[str] = ..., request_json: _Optional[bytes] = ..., parent_result_json: _Optional[bytes] = ..., artifact_uploads: _Optional[_Iterable[_Union[ArtifactUpload, _Mapping]]] = ..., parent_job_id: _Optional[str] = ..., parent_artifacts: _Optional[_Iterable[_Union[ParentArtifact, _Mapping]]] = ..., datasets: _Optional[_Iterable[_Union[DatasetFile, _Mapping]]] = ..., webhook_url: _Optional[str] = ...) -> None: ...

class DatasetFile(_message.Message):
    __slots__ = ("role", "url", "sha256", "bytes", "filename")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    role: str
    url: str
    sha256: str
    bytes: int
    filename: str
    def __init__(self, role: _Optional[str] = ..., url: _Optional[str] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ..., filename: _Optional[str] = ...) -> None: ...

class ParentArtifact(_message.Message):
    __slots__ = ("name", "url", "sha256", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    sha256: str
    bytes: int
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class ArtifactUpload(_message.Message):
    __slots__ = ("name", "url")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("provider_job_id",)
    PROVIDER_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    provider_job_id: str
    def __init__(self, provider_job_id: _Optional[str] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("provider_job_id", "account", "cursor", "job_id")
    PROVIDER_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    provider_job_id: str
    account: _common_pb2.Account
    cursor: str
    job_id: str
    def __init__(self, provider_job_id: _Optional[str] = ..., account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ..., cursor: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("state", "events", "cursor", "error", "result_ready", "stage_message", "usage")
    STATE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESULT_READY_FIELD_NUMBER: _ClassVar[int]
    STAGE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.JobState
    events: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProgressEvent]
    cursor: str
    error: str
    result_ready: bool
    stage_message: str
    usage: _common_pb2.JobUsage
    def __init__(self, state: _Optional[_Union[_common_pb2.JobState, str]] = ..., events: _Optional[_Iterable[_Union[_common_pb2.ProgressEvent, _Mapping]]] = ..., cursor: _Optional[str] = ..., error: _Optional[str] = ..., result_ready: bool = ..., stage_message: _Optional[str] = ..., usage: _Optional[_Union[_common_pb2.JobUsage, _Mapping]] = ...) -> None: ...

class GetResultRequest(_message.Message):
    __slots__ = ("provider_job_id", "account", "job_id")
    PROVIDER_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    provider_job_id: str
    account: _common_pb2.Account
    job_id: str
    def __init__(self, provider_job_id: _Optional[str] = ..., account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...

class GetResultResponse(_message.Message):
    __slots__ = ("result_json",)
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    result_json: bytes
    def __init__(self, result_json: _Optional[bytes] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("provider_job_id", "account", "job_id")
    PROVIDER_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    provider_job_id: str
    account: _common_pb2.Account
    job_id: str
    def __init__(self, provider_job_id: _Optional[str] = ..., account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ..., job_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: _common_pb2.JobState
    def __init__(self, state: _Optional[_Union[_common_pb2.JobState, str]] = ...) -> None: ...

class EstimateRequest(_message.Message):
    __slots__ = ("spec_json", "backend", "kind", "request_json")
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    spec_json: bytes
    backend: str
    kind: str
    request_json: bytes
    def __init__(self, spec_json: _Optional[bytes] = ..., backend: _Optional[str] = ..., kind: _Optional[str] = ..., request_json: _Optional[bytes] = ...) -> None: ...

class EstimateResponse(_message.Message):
    __slots__ = ("estimate",)
    ESTIMATE_FIELD_NUMBER: _ClassVar[int]
    estimate: _common_pb2.Estimate
    def __init__(self, estimate: _Optional[_Union[_common_pb2.Estimate, _Mapping]] = ...) -> None: ...

class FetchArtifactRequest(_message.Message):
    __slots__ = ("provider_job_id", "account", "job_id", "name")
    PROVIDER_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    provider_job_id: str
    account: _common_pb2.Account
    job_id: str
    name: str
    def __init__(self, provider_job_id: _Optional[str] = ..., account: _Optional[_Union[_common_pb2.Account, _Mapping]] = ..., job_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

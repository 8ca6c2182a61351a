import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from influence.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GrantUploadRequest(_message.Message):
    __slots__ = ("job_id", "secret", "name", "bytes", "sha256")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    secret: str
    name: str
    bytes: int
    sha256: str
    def __init__(self, job_id: _Optional[str] = ..., secret: _Optional[str] = ..., name: _Optional[str] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class GrantUploadResponse(_message.Message):
    __slots__ = ("url", "headers")
    class HeadersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    URL_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    url: str
    headers: _containers.ScalarMap[str, str]
    def __init__(self, url: _Optional[str] = ..., headers: _Optional[_Mapping[str, str]] = ...) -> None: ...

class WakeJobRequest(_message.Message):
    __slots__ = ("job_id", "secret")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    secret: str
    def __init__(self, job_id: _Optional[str] = ..., secret: _Optional[str] = ...) -> None: ...

class WakeJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetTrackingSettingsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class SetTrackingSettingsRequest(_message.Message):
    __slots__ = ("user_id", "mlflow_tracking_uri", "mlflow_experiment_name", "wandb_project", "wandb_entity")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_TRACKING_URI_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    WANDB_PROJECT_FIELD_NUMBER: _ClassVar[int]
    WANDB_ENTITY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    mlflow_tracking_uri: str
    mlflow_experiment_name: str
    wandb_project: str
    wandb_entity: str
    def __init__(self, user_id: _Optional[str] = ..., mlflow_tracking_uri: _Optional[str] = ..., mlflow_experiment_name: _Optional[str] = ..., wandb_project: _Optional[str] = ..., wandb_entity: _Optional[str] = ...) -> None: ...

class TrackingSettings(_message.Message):
    __slots__ = ("mlflow_tracking_uri", "mlflow_experiment_name", "wandb_project", "wandb_entity", "operator_mlflow", "operator_wandb")
    MLFLOW_TRACKING_URI_FIELD_NUMBER: _ClassVar[int]
    MLFLOW_EXPERIMENT_NAME_FIELD_NUMBER: _ClassVar[int]
    WANDB_PROJECT_FIELD_NUMBER: _ClassVar[int]
    WANDB_ENTITY_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_MLFLOW_FIELD_NUMBER: _ClassVar[int]
    OPERATOR_WANDB_FIELD_NUMBER: _ClassVar[int]
    mlflow_tracking_uri: str
    mlflow_experiment_name: str
    wandb_project: str
    wandb_entity: str
    operator_mlflow: bool
    operator_wandb: bool
    def __init__(self, mlflow_tracking_uri: _Optional[str] = ..., mlflow_experiment_name: _Optional[str] = ..., wandb_project: _Optional[str] = ..., wandb_entity: _Optional[str] = ..., operator_mlflow: bool = ..., operator_wandb: bool = ...) -> None: ...

class RunpodEndpointRequest(_message.Message):
    __slots__ = ("user_id", "key_stored")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_STORED_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    key_stored: bool
    def __init__(self, user_id: _Optional[str] = ..., key_stored: bool = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("id", "kind", "filename", "format", "count", "text_chars", "answer_chars", "bytes", "sha256", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_CHARS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: str
    filename: str
    format: str
    count: int
    text_chars: int
    answer_chars: int
    bytes: int
    sha256: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[str] = ..., filename: _Optional[str] = ..., format: _Optional[str] = ..., count: _Optional[int] = ..., text_chars: _Optional[int] = ..., answer_chars: _Optional[int] = ..., bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("header", "user_id", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: Dataset
    user_id: str
    data: bytes
    def __init__(self, header: _Optional[_Union[Dataset, _Mapping]] = ..., user_id: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ("datasets",)
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[Dataset]
    def __init__(self, datasets: _Optional[_Iterable[_Union[Dataset, _Mapping]]] = ...) -> None: ...

class DatasetRequest(_message.Message):
    __slots__ = ("user_id", "dataset_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DATASET_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    dataset_id: str
    def __init__(self, user_id: _Optional[str] = ..., dataset_id: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "user_id", "compute_backend", "provider", "provider_job_id", "state", "stage", "progress", "stage_message", "latest_metrics_json", "error", "estimated_time_s", "estimated_cost_usd", "model_id", "influence_method", "n_train", "n_eval", "created_at", "updated_at", "finished_at", "last_seq", "kind", "parent_job_id", "request_json", "name", "tags", "note", "started_at", "outcome_json", "actual", "estimated_gpu", "estimated_usd_per_second", "max_cost_usd", "tracking_json", "shards", "parts")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    STAGE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LATEST_METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_TIME_S_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_COST_USD_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INFLUENCE_METHOD_FIELD_NUMBER: _ClassVar[int]
    N_TRAIN_FIELD_NUMBER: _ClassVar[int]
    N_EVAL_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_JSON_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_GPU_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_USD_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    TRACKING_JSON_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    user_id: str
    compute_backend: str
    provider: str
    provider_job_id: str
    state: _common_pb2.JobState
    stage: str
    progress: float
    stage_message: str
    latest_metrics_json: bytes
    error: str
    estimated_time_s: float
    estimated_cost_usd: float
    model_id: str
    influence_method: str
    n_train: int
    n_eval: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    last_seq: int
    kind: str
    parent_job_id: str
    request_json: bytes
    name: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    note: str
    started_at: _timestamp_pb2.Timestamp
    outcome_json: bytes
    actual: _common_pb2.JobCost
    estimated_gpu: str
    estimated_usd_per_second: float
    max_cost_usd: float
    tracking_json: bytes
    shards: int
    parts: _containers.RepeatedCompositeFieldContainer[JobPart]
    def __init__(self, id: _Optional[str] = ..., user_id: _Optional[str] = ..., compute_backend: _Optional[str] = ..., provider: _Optional[str] = ..., provider_job_id: _Optional[str] = ..., state: _Optional[_Union[_common_pb2.JobState, str]] = ..., stage: _Optional[str] = ..., progress: _Optional[float] = ..., stage_message: _Optional[str] = ..., latest_metrics_json: _Optional[bytes] = ..., error: _Optional[str] = ..., estimated_time_s: _Optional[float] = ..., estimated_cost_usd: _Optional[float] = ..., model_id: _Optional[str] = ..., influence_method: _Optional[str] = ..., n_train: _Optional[int] = ..., n_eval: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seq: _Optional[int] = ..., kind: _Optional[str] = ..., parent_job_id: _Optional[str] = ..., request_json: _Optional[bytes] = ..., name: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ..., note: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., outcome_json: _Optional[bytes] = ..., actual: _Optional[_Union[_common_pb2.JobCost, _Mapping]] = ..., estimated_gpu: _Optional[str] = ..., estimated_usd_per_second: _Optional[float] = ..., max_cost_usd: _Optional[float] = ..., tracking_json: _Optional[bytes] = ..., shards: _Optional[int] = ..., parts: _Optional[_Iterable[_Union[JobPart, _Mapping]]] = ...) -> None: ...

class JobPart(_message.Message):
    __slots__ = ("kind", "shard", "job_id", "status", "progress", "attempts", "error")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    kind: str
    shard: int
    job_id: str
    status: str
    progress: float
    attempts: int
    error: str
    def __init__(self, kind: _Optional[str] = ..., shard: _Optional[int] = ..., job_id: _Optional[str] = ..., status: _Optional[str] = ..., progress: _Optional[float] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("user_id", "spec_json", "idempotency_key", "kind", "parent_job_id", "request_json", "max_cost_usd")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_COST_USD_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    spec_json: bytes
    idempotency_key: str
    kind: str
    parent_job_id: str
    request_json: bytes
    max_cost_usd: float
    def __init__(self, user_id: _Optional[str] = ..., spec_json: _Optional[bytes] = ..., idempotency_key: _Optional[str] = ..., kind: _Optional[str] = ..., parent_job_id: _Optional[str] = ..., request_json: _Optional[bytes] = ..., max_cost_usd: _Optional[float] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("user_id", "job_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("user_id", "limit", "parent_job_id", "kind", "tag", "model_id", "influence_method", "status")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    PARENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TAG_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INFLUENCE_METHOD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    limit: int
    parent_job_id: str
    kind: str
    tag: str
    model_id: str
    influence_method: str
    status: str
    def __init__(self, user_id: _Optional[str] = ..., limit: _Optional[int] = ..., parent_job_id: _Optional[str] = ..., kind: _Optional[str] = ..., tag: _Optional[str] = ..., model_id: _Optional[str] = ..., influence_method: _Optional[str] = ..., status: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("user_id", "job_id", "after_seq")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    after_seq: int
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class GetJobResultRequest(_message.Message):
    __slots__ = ("user_id", "job_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class GetJobResultResponse(_message.Message):
    __slots__ = ("result_json",)
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    result_json: bytes
    def __init__(self, result_json: _Optional[bytes] = ...) -> None: ...

class GetJobSpecRequest(_message.Message):
    __slots__ = ("user_id", "job_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class GetJobSpecResponse(_message.Message):
    __slots__ = ("spec_json",)
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    spec_json: bytes
    def __init__(self, spec_json: _Optional[bytes] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("user_id", "job_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class ComputeSettings(_message.Message):
    __slots__ = ("backend", "runpod_endpoint_id", "endpoint_status", "endpoint_error", "hosted_provider")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    RUNPOD_ENDPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_STATUS_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_ERROR_FIELD_NUMBER: _ClassVar[int]
    HOSTED_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    backend: str
    runpod_endpoint_id: str
    endpoint_status: str
    endpoint_error: str
    hosted_provider: str
    def __init__(self, backend: _Optional[str] = ..., runpod_endpoint_id: _Optional[str] = ..., endpoint_status: _Optional[str] = ..., endpoint_error: _Optional[str] = ..., hosted_provider: _Optional[str] = ...) -> None: ...

class GetComputeSettingsRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class SetComputeBackendRequest(_message.Message):
    __slots__ = ("user_id", "backend")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    backend: str
    def __init__(self, user_id: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

class VerifyProviderKeyRequest(_message.Message):
    __slots__ = ("user_id", "provider", "api_key")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    provider: str
    api_key: str
    def __init__(self, user_id: _Optional[str] = ..., provider: _Optional[str] = ..., api_key: _Optional[str] = ...) -> None: ...

class VerifyProviderKeyResponse(_message.Message):
    __slots__ = ("valid", "balance_usd", "message", "failure")
    VALID_FIELD_NUMBER: _ClassVar[int]
    BALANCE_USD_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    valid: bool
    balance_usd: float
    message: str
    failure: _common_pb2.KeyFailure
    def __init__(self, valid: bool = ..., balance_usd: _Optional[float] = ..., message: _Optional[str] = ..., failure: _Optional[_Union[_common_pb2.KeyFailure, str]] = ...) -> None: ...

class EstimateJobRequest(_message.Message):
    __slots__ = ("user_id", "spec_json", "kind", "parent_job_id", "request_json")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARENT_JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_JSON_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    spec_json: bytes
    kind: str
    parent_job_id: str
    request_json: bytes
    def __init__(self, user_id: _Optional[str] = ..., spec_json: _Optional[bytes] = ..., kind: _Optional[str] = ..., parent_job_id: _Optional[str] = ..., request_json: _Optional[bytes] = ...) -> None: ...

class EstimateJobResponse(_message.Message):
    __slots__ = ("active_backend", "estimates", "notes")
    ACTIVE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ESTIMATES_FIELD_NUMBER: _ClassVar[int]
    NOTES_FIELD_NUMBER: _ClassVar[int]
    active_backend: str
    estimates: _containers.RepeatedCompositeFieldContainer[_common_pb2.Estimate]
    notes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, active_backend: _Optional[str] = ..., estimates: _Optional[_Iterable[_Union[_common_pb2.Estimate, _Mapping]]] = ..., notes: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("user_id", "job_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ("deleted_artifacts",)
    DELETED_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    deleted_artifacts: int
    def __init__(self, deleted_artifacts: _Optional[int] = ...) -> None: ...

class ListJobArtifactsRequest(_message.Message):
    __slots__ = ("user_id", "job_id")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class ListJobArtifactsResponse(_message.Message):
    __slots__ = ("artifacts",)
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Artifact]
    def __init__(self, artifacts: _Optional[_Iterable[_Union[_common_pb2.Artifact, _Mapping]]] = ...) -> None: ...

class JobArtifactRequest(_message.Message):
    __slots__ = ("user_id", "job_id", "name")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    name: str
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class OpenJobArtifactResponse(_message.Message):
    __slots__ = ("artifact", "download_url")
    ARTIFACT_FIELD_NUMBER: _ClassVar[int]
    DOWNLOAD_URL_FIELD_NUMBER: _ClassVar[int]
    artifact: _common_pb2.Artifact
    download_url: str
    def __init__(self, artifact: _Optional[_Union[_common_pb2.Artifact, _Mapping]] = ..., download_url: _Optional[str] = ...) -> None: ...

class UpdateJobLabelsRequest(_message.Message):
    __slots__ = ("user_id", "job_id", "name", "note", "set_tags", "tags")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    SET_TAGS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    job_id: str
    name: str
    note: str
    set_tags: bool
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, user_id: _Optional[str] = ..., job_id: _Optional[str] = ..., name: _Optional[str] = ..., note: _Optional[str] = ..., set_tags: bool = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("user_id",)
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    def __init__(self, user_id: _Optional[str] = ...) -> None: ...

class UsageLimit(_message.Message):
    __slots__ = ("name", "used", "limit", "description", "resets_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    used: float
    limit: float
    description: str
    resets_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., used: _Optional[float] = ..., limit: _Optional[float] = ..., description: _Optional[str] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("backend", "limits", "max_job_time_s", "max_job_cost_usd")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_TIME_S_FIELD_NUMBER: _ClassVar[int]
    MAX_JOB_COST_USD_FIELD_NUMBER: _ClassVar[int]
    backend: str
    limits: _containers.RepeatedCompositeFieldContainer[UsageLimit]
    max_job_time_s: float
    max_job_cost_usd: float
    def __init__(self, backend: _Optional[str] = ..., limits: _Optional[_Iterable[_Union[UsageLimit, _Mapping]]] = ..., max_job_time_s: _Optional[float] = ..., max_job_cost_usd: _Optional[float] = ...) -> None: ...

class ListActiveJobsRequest(_message.Message):
    __slots__ = ("user_id", "backend")
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    user_id: str
    backend: str
    def __init__(self, user_id: _Optional[str] = ..., backend: _Optional[str] = ...) -> None: ...

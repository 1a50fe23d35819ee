import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_TARGET_UNSPECIFIED: _ClassVar[AdapterTarget]
    ADAPTER_TARGET_ACTIVE: _ClassVar[AdapterTarget]
    ADAPTER_TARGET_BASE: _ClassVar[AdapterTarget]
    ADAPTER_TARGET_PINNED: _ClassVar[AdapterTarget]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_ABORT: _ClassVar[FinishReason]

class AdapterMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_MODE_UNSPECIFIED: _ClassVar[AdapterMode]
    ADAPTER_MODE_LORA: _ClassVar[AdapterMode]
    ADAPTER_MODE_MERGED: _ClassVar[AdapterMode]
ADAPTER_TARGET_UNSPECIFIED: AdapterTarget
ADAPTER_TARGET_ACTIVE: AdapterTarget
ADAPTER_TARGET_BASE: AdapterTarget
ADAPTER_TARGET_PINNED: AdapterTarget
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_ABORT: FinishReason
ADAPTER_MODE_UNSPECIFIED: AdapterMode
ADAPTER_MODE_LORA: AdapterMode
ADAPTER_MODE_MERGED: AdapterMode

class AdapterRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class AdapterSelector(_message.Message):
    __slots__ = ("target", "pinned")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    target: AdapterTarget
    pinned: AdapterRef
    def __init__(self, target: _Optional[_Union[AdapterTarget, str]] = ..., pinned: _Optional[_Union[AdapterRef, _Mapping]] = ...) -> None: ...

class ServedBy(_message.Message):
    __slots__ = ("base", "adapter", "sha256")
    BASE_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    base: bool
    adapter: AdapterRef
    sha256: str
    def __init__(self, base: _Optional[bool] = ..., adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., sha256: _Optional[str] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed", "logprobs", "top_logprobs", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos")
    N_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    seed: int
    logprobs: bool
    top_logprobs: int
    min_tokens: int
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    ignore_eos: bool
    def __init__(self, n: _Optional[int] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., min_p: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., seed: _Optional[int] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., min_tokens: _Optional[int] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompts", "params", "adapter")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedCompositeFieldContainer[_common_pb2.Prompt]
    params: SamplingParams
    adapter: AdapterSelector
    def __init__(self, prompts: _Optional[_Iterable[_Union[_common_pb2.Prompt, _Mapping]]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., adapter: _Optional[_Union[AdapterSelector, _Mapping]] = ...) -> None: ...

class TopLogprobs(_message.Message):
    __slots__ = ("token_ids", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Completion(_message.Message):
    __slots__ = ("index", "text", "token_ids", "logprobs", "top_logprobs", "finish_reason", "stop_string")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    finish_reason: FinishReason
    stop_string: str
    def __init__(self, index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_string: _Optional[str] = ...) -> None: ...

class PromptResult(_message.Message):
    __slots__ = ("prompt_index", "prompt_token_ids", "completions", "served_by", "finished_by")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    FINISHED_BY_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    completions: _containers.RepeatedCompositeFieldContainer[Completion]
    served_by: ServedBy
    finished_by: ServedBy
    def __init__(self, prompt_index: _Optional[int] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., completions: _Optional[_Iterable[_Union[Completion, _Mapping]]] = ..., served_by: _Optional[_Union[ServedBy, _Mapping]] = ..., finished_by: _Optional[_Union[ServedBy, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("results", "usage", "request_id")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[PromptResult]
    usage: _common_pb2.Usage
    request_id: str
    def __init__(self, results: _Optional[_Iterable[_Union[PromptResult, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateStreamRequest(_message.Message):
    __slots__ = ("prompt", "params", "adapter")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    prompt: _common_pb2.Prompt
    params: SamplingParams
    adapter: AdapterSelector
    def __init__(self, prompt: _Optional[_Union[_common_pb2.Prompt, _Mapping]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., adapter: _Optional[_Union[AdapterSelector, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("index", "text_delta", "token_ids", "logprobs", "top_logprobs", "finish_reason", "stop_string", "served_by", "prompt_token_ids", "usage", "finished_by")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_BY_FIELD_NUMBER: _ClassVar[int]
    index: int
    text_delta: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprobs]
    finish_reason: FinishReason
    stop_string: str
    served_by: ServedBy
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    usage: _common_pb2.Usage
    finished_by: ServedBy
    def __init__(self, index: _Optional[int] = ..., text_delta: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprobs, _Mapping]]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., stop_string: _Optional[str] = ..., served_by: _Optional[_Union[ServedBy, _Mapping]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., finished_by: _Optional[_Union[ServedBy, _Mapping]] = ...) -> None: ...

class AdapterHeader(_message.Message):
    __slots__ = ("adapter", "sha256", "size_bytes", "base_model_id", "peft_config_json", "skip_activate", "base_model_fingerprint", "stage_seconds")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PEFT_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SKIP_ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    sha256: str
    size_bytes: int
    base_model_id: str
    peft_config_json: str
    skip_activate: bool
    base_model_fingerprint: str
    stage_seconds: int
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., base_model_id: _Optional[str] = ..., peft_config_json: _Optional[str] = ..., skip_activate: _Optional[bool] = ..., base_model_fingerprint: _Optional[str] = ..., stage_seconds: _Optional[int] = ...) -> None: ...

class PushAdapterRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: AdapterHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[AdapterHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("adapter", "sha256", "size_bytes", "rank", "target_modules", "loaded_at", "active", "in_flight_requests", "staged", "staged_until")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STAGED_FIELD_NUMBER: _ClassVar[int]
    STAGED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    sha256: str
    size_bytes: int
    rank: int
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    loaded_at: _timestamp_pb2.Timestamp
    active: bool
    in_flight_requests: int
    staged: bool
    staged_until: _timestamp_pb2.Timestamp
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., rank: _Optional[int] = ..., target_modules: _Optional[_Iterable[str]] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ..., in_flight_requests: _Optional[int] = ..., staged: _Optional[bool] = ..., staged_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PushAdapterResponse(_message.Message):
    __slots__ = ("adapter", "activated", "load_seconds")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    activated: bool
    load_seconds: float
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ..., activated: _Optional[bool] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class SetActiveAdapterRequest(_message.Message):
    __slots__ = ("adapter", "base")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    base: bool
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., base: _Optional[bool] = ...) -> None: ...

class SetActiveAdapterResponse(_message.Message):
    __slots__ = ("previous", "active")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    previous: ServedBy
    active: ServedBy
    def __init__(self, previous: _Optional[_Union[ServedBy, _Mapping]] = ..., active: _Optional[_Union[ServedBy, _Mapping]] = ...) -> None: ...

class DropAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ...) -> None: ...

class DropAdapterResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: bool
    def __init__(self, dropped: _Optional[bool] = ...) -> None: ...

class KeepAdapterRequest(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ...) -> None: ...

class KeepAdapterResponse(_message.Message):
    __slots__ = ("adapter",)
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterInfo
    def __init__(self, adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "active", "next_version")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    NEXT_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterInfo]
    active: ServedBy
    next_version: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterInfo, _Mapping]]] = ..., active: _Optional[_Union[ServedBy, _Mapping]] = ..., next_version: _Optional[int] = ...) -> None: ...

class PolicyServiceGetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicyServiceGetInfoResponse(_message.Message):
    __slots__ = ("server", "base_model_id", "max_model_len", "max_n", "max_prompts_per_request", "max_lora_rank", "max_adapter_bytes", "keep_versions", "adapter_mode", "active", "engine", "dtype", "default_max_tokens", "base_model_fingerprint")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPTS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_ADAPTER_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEP_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_MODE_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    server: _common_pb2.ServerInfo
    base_model_id: str
    max_model_len: int
    max_n: int
    max_prompts_per_request: int
    max_lora_rank: int
    max_adapter_bytes: int
    keep_versions: int
    adapter_mode: AdapterMode
    active: ServedBy
    engine: str
    dtype: str
    default_max_tokens: int
    base_model_fingerprint: str
    def __init__(self, server: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ..., base_model_id: _Optional[str] = ..., max_model_len: _Optional[int] = ..., max_n: _Optional[int] = ..., max_prompts_per_request: _Optional[int] = ..., max_lora_rank: _Optional[int] = ..., max_adapter_bytes: _Optional[int] = ..., keep_versions: _Optional[int] = ..., adapter_mode: _Optional[_Union[AdapterMode, str]] = ..., active: _Optional[_Union[ServedBy, _Mapping]] = ..., engine: _Optional[str] = ..., dtype: _Optional[str] = ..., default_max_tokens: _Optional[int] = ..., base_model_fingerprint: _Optional[str] = ...) -> None: ...

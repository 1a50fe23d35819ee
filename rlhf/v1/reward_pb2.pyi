import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from rlhf.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "prompt_messages", "completion", "reference", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    completion: str
    reference: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, prompt: _Optional[str] = ..., prompt_messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., completion: _Optional[str] = ..., reference: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ...) -> None: ...

class ScorerScore(_message.Message):
    __slots__ = ("scorer", "score", "weight", "model_version")
    SCORER_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    scorer: str
    score: float
    weight: float
    model_version: str
    def __init__(self, scorer: _Optional[str] = ..., score: _Optional[float] = ..., weight: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...

class ItemScore(_message.Message):
    __slots__ = ("score", "by_scorer")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BY_SCORER_FIELD_NUMBER: _ClassVar[int]
    score: float
    by_scorer: _containers.RepeatedCompositeFieldContainer[ScorerScore]
    def __init__(self, score: _Optional[float] = ..., by_scorer: _Optional[_Iterable[_Union[ScorerScore, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "request_id", "model_versions")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ItemScore]
    request_id: str
    model_versions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, scores: _Optional[_Iterable[_Union[ItemScore, _Mapping]]] = ..., request_id: _Optional[str] = ..., model_versions: _Optional[_Iterable[str]] = ...) -> None: ...

class RewardServiceGetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ScorerInfo(_message.Message):
    __slots__ = ("name", "kind", "weight", "normalized")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    weight: float
    normalized: bool
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., weight: _Optional[float] = ..., normalized: _Optional[bool] = ...) -> None: ...

class RewardServiceGetInfoResponse(_message.Message):
    __slots__ = ("server", "scorers", "max_batch_items", "max_text_chars")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    SCORERS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    server: _common_pb2.ServerInfo
    scorers: _containers.RepeatedCompositeFieldContainer[ScorerInfo]
    max_batch_items: int
    max_text_chars: int
    def __init__(self, server: _Optional[_Union[_common_pb2.ServerInfo, _Mapping]] = ..., scorers: _Optional[_Iterable[_Union[ScorerInfo, _Mapping]]] = ..., max_batch_items: _Optional[int] = ..., max_text_chars: _Optional[int] = ...) -> None: ...

class RewardModelFile(_message.Message):
    __slots__ = ("name", "size_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class RewardModelHeader(_message.Message):
    __slots__ = ("version", "files", "sha256", "size_bytes", "skip_activate", "heldout_accuracy", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SKIP_ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    version: str
    files: _containers.RepeatedCompositeFieldContainer[RewardModelFile]
    sha256: str
    size_bytes: int
    skip_activate: bool
    heldout_accuracy: float
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, version: _Optional[str] = ..., files: _Optional[_Iterable[_Union[RewardModelFile, _Mapping]]] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., skip_activate: _Optional[bool] = ..., heldout_accuracy: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class PushRewardModelRequest(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: RewardModelHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[RewardModelHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RewardModelInfo(_message.Message):
    __slots__ = ("version", "sha256", "size_bytes", "heldout_accuracy", "metadata", "pushed_at", "active")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HELDOUT_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PUSHED_AT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    version: str
    sha256: str
    size_bytes: int
    heldout_accuracy: float
    metadata: _containers.ScalarMap[str, str]
    pushed_at: _timestamp_pb2.Timestamp
    active: bool
    def __init__(self, version: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ..., heldout_accuracy: _Optional[float] = ..., metadata: _Optional[_Mapping[str, str]] = ..., pushed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active: _Optional[bool] = ...) -> None: ...

class PushRewardModelResponse(_message.Message):
    __slots__ = ("model", "activated", "load_seconds")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    model: RewardModelInfo
    activated: bool
    load_seconds: float
    def __init__(self, model: _Optional[_Union[RewardModelInfo, _Mapping]] = ..., activated: _Optional[bool] = ..., load_seconds: _Optional[float] = ...) -> None: ...

class SetActiveRewardModelRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: str
    def __init__(self, version: _Optional[str] = ...) -> None: ...

class SetActiveRewardModelResponse(_message.Message):
    __slots__ = ("previous", "active")
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    previous: str
    active: str
    def __init__(self, previous: _Optional[str] = ..., active: _Optional[str] = ...) -> None: ...

class ListRewardModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRewardModelsResponse(_message.Message):
    __slots__ = ("models", "active")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[RewardModelInfo]
    active: str
    def __init__(self, models: _Optional[_Iterable[_Union[RewardModelInfo, _Mapping]]] = ..., active: _Optional[str] = ...) -> None: ...

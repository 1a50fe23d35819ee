import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Algorithm(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ALGORITHM_UNSPECIFIED: _ClassVar[Algorithm]
    ALGORITHM_PPO: _ClassVar[Algorithm]
    ALGORITHM_GRPO: _ClassVar[Algorithm]
    ALGORITHM_RLOO: _ClassVar[Algorithm]

class RunState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATE_UNSPECIFIED: _ClassVar[RunState]
    RUN_STATE_PENDING: _ClassVar[RunState]
    RUN_STATE_RUNNING: _ClassVar[RunState]
    RUN_STATE_WAITING: _ClassVar[RunState]
    RUN_STATE_STOPPING: _ClassVar[RunState]
    RUN_STATE_STOPPED: _ClassVar[RunState]
    RUN_STATE_COMPLETED: _ClassVar[RunState]
    RUN_STATE_FAILED: _ClassVar[RunState]

class RunEventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_EVENT_KIND_UNSPECIFIED: _ClassVar[RunEventKind]
    RUN_EVENT_KIND_STATE_CHANGED: _ClassVar[RunEventKind]
    RUN_EVENT_KIND_ADAPTER_PUSHED: _ClassVar[RunEventKind]
    RUN_EVENT_KIND_PUSH_FAILED: _ClassVar[RunEventKind]
    RUN_EVENT_KIND_CHECKPOINT_SAVED: _ClassVar[RunEventKind]
    RUN_EVENT_KIND_WAITING: _ClassVar[RunEventKind]
ALGORITHM_UNSPECIFIED: Algorithm
ALGORITHM_PPO: Algorithm
ALGORITHM_GRPO: Algorithm
ALGORITHM_RLOO: Algorithm
RUN_STATE_UNSPECIFIED: RunState
RUN_STATE_PENDING: RunState
RUN_STATE_RUNNING: RunState
RUN_STATE_WAITING: RunState
RUN_STATE_STOPPING: RunState
RUN_STATE_STOPPED: RunState
RUN_STATE_COMPLETED: RunState
RUN_STATE_FAILED: RunState
RUN_EVENT_KIND_UNSPECIFIED: RunEventKind
RUN_EVENT_KIND_STATE_CHANGED: RunEventKind
RUN_EVENT_KIND_ADAPTER_PUSHED: RunEventKind
RUN_EVENT_KIND_PUSH_FAILED: RunEventKind
RUN_EVENT_KIND_CHECKPOINT_SAVED: RunEventKind
RUN_EVENT_KIND_WAITING: RunEventKind

class RunConfig(_message.Message):
    __slots__ = ("algorithm", "model", "init_adapter", "prompts_path", "steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens", "temperature", "learning_rate", "ppo_epochs", "minibatch_size", "clip_range", "clip_range_value", "gamma", "lam", "kl_coef", "target_kl", "kl_estimator", "lora_rank", "lora_alpha", "target_modules", "max_staleness", "seed", "checkpoint_every", "adapter_name", "push_quorum", "device", "compute_dtype", "micro_batch_size", "gradient_checkpointing", "loss_type", "clip_range_low", "clip_range_high", "mismatch_correction", "mismatch_threshold", "dynamic_sampling", "max_refill_rounds", "overlong", "overlong_buffer", "overlong_penalty", "report_to", "eval_prompts_path", "eval_every", "eval_samples", "eval_temperature", "max_eval_drop", "keep_checkpoints", "resume_from", "max_update_norm", "on_bad_step", "max_bad_steps", "stage_seconds", "delivery_threshold", "delivery_samples", "promotion", "canary_wait_seconds")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INIT_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_PATH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_PER_STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PPO_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    MINIBATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_VALUE_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    LAM_FIELD_NUMBER: _ClassVar[int]
    KL_COEF_FIELD_NUMBER: _ClassVar[int]
    TARGET_KL_FIELD_NUMBER: _ClassVar[int]
    KL_ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    PUSH_QUORUM_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    LOSS_TYPE_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_LOW_FIELD_NUMBER: _ClassVar[int]
    CLIP_RANGE_HIGH_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_REFILL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    OVERLONG_FIELD_NUMBER: _ClassVar[int]
    OVERLONG_BUFFER_FIELD_NUMBER: _ClassVar[int]
    OVERLONG_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPORT_TO_FIELD_NUMBER: _ClassVar[int]
    EVAL_PROMPTS_PATH_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    EVAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_EVAL_DROP_FIELD_NUMBER: _ClassVar[int]
    KEEP_CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    RESUME_FROM_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_NORM_FIELD_NUMBER: _ClassVar[int]
    ON_BAD_STEP_FIELD_NUMBER: _ClassVar[int]
    MAX_BAD_STEPS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PROMOTION_FIELD_NUMBER: _ClassVar[int]
    CANARY_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    algorithm: Algorithm
    model: str
    init_adapter: str
    prompts_path: str
    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    learning_rate: float
    ppo_epochs: int
    minibatch_size: int
    clip_range: float
    clip_range_value: float
    gamma: float
    lam: float
    kl_coef: float
    target_kl: float
    kl_estimator: str
    lora_rank: int
    lora_alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    max_staleness: int
    seed: int
    checkpoint_every: int
    adapter_name: str
    push_quorum: float
    device: str
    compute_dtype: str
    micro_batch_size: int
    gradient_checkpointing: bool
    loss_type: str
    clip_range_low: float
    clip_range_high: float
    mismatch_correction: str
    mismatch_threshold: float
    dynamic_sampling: bool
    max_refill_rounds: int
    overlong: str
    overlong_buffer: int
    overlong_penalty: float
    report_to: str
    eval_prompts_path: str
    eval_every: int
    eval_samples: int
    eval_temperature: float
    max_eval_drop: float
    keep_checkpoints: int
    resume_from: str
    max_update_norm: float
    on_bad_step: str
    max_bad_steps: int
    stage_seconds: int
    delivery_threshold: float
    delivery_samples: int
    promotion: str
    canary_wait_seconds: float
    def __init__(self, algorithm: _Optional[_Union[Algorithm, str]] = ..., model: _Optional[str] = ..., init_adapter: _Optional[str] = ..., prompts_path: _Optional[str] = ..., steps: _Optional[int] = ..., prompts_per_step: _Optional[int] = ..., samples_per_prompt: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., learning_rate: _Optional[float] = ..., ppo_epochs: _Optional[int] = ..., minibatch_size: _Optional[int] = ..., clip_range: _Optional[float] = ..., clip_range_value: _Optional[float] = ..., gamma: _Optional[float] = ..., lam: _Optional[float] = ..., kl_coef: _Optional[float] = ..., target_kl: _Optional[float] = ..., kl_estimator: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., max_staleness: _Optional[int] = ..., seed: _Optional[int] = ..., checkpoint_every: _Optional[int] = ..., adapter_name: _Optional[str] = ..., push_quorum: _Optional[float] = ..., device: _Optional[str] = ..., compute_dtype: _Optional[str] = ..., micro_batch_size: _Optional[int] = ..., gradient_checkpointing: _Optional[bool] = ..., loss_type: _Optional[str] = ..., clip_range_low: _Optional[float] = ..., clip_range_high: _Optional[float] = ..., mismatch_correction: _Optional[str] = ..., mismatch_threshold: _Optional[float] = ..., dynamic_sampling: _Optional[bool] = ..., max_refill_rounds: _Optional[int] = ..., overlong: _Optional[str] = ..., overlong_buffer: _Optional[int] = ..., overlong_penalty: _Optional[float] = ..., report_to: _Optional[str] = ..., eval_prompts_path: _Optional[str] = ..., eval_every: _Optional[int] = ..., eval_samples: _Optional[int] = ..., eval_temperature: _Optional[float] = ..., max_eval_drop: _Optional[float] = ..., keep_checkpoints: _Optional[int] = ..., resume_from: _Optional[str] = ..., max_update_norm: _Optional[float] = ..., on_bad_step: _Optional[str] = ..., max_bad_steps: _Optional[int] = ..., stage_seconds: _Optional[int] = ..., delivery_threshold: _Optional[float] = ..., delivery_samples: _Optional[int] = ..., promotion: _Optional[str] = ..., canary_wait_seconds: _Optional[float] = ...) -> None: ...

class StepMetrics(_message.Message):
    __slots__ = ("step", "reward_mean", "reward_std", "kl", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "logprob_mismatch", "staleness", "samples_per_second", "generate_seconds", "score_seconds", "train_seconds", "push_seconds", "adapter_version", "kl_coef", "step_seconds", "peak_memory_gb", "mismatch_ratio_mean", "mismatch_ratio_max", "mismatch_masked_share", "mismatch_kl")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REWARD_MEAN_FIELD_NUMBER: _ClassVar[int]
    REWARD_STD_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    POLICY_LOSS_FIELD_NUMBER: _ClassVar[int]
    VALUE_LOSS_FIELD_NUMBER: _ClassVar[int]
    CLIPFRAC_FIELD_NUMBER: _ClassVar[int]
    APPROX_KL_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_MISMATCH_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    GENERATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SCORE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PUSH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    KL_COEF_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_RATIO_MEAN_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_RATIO_MAX_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_MASKED_SHARE_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_KL_FIELD_NUMBER: _ClassVar[int]
    step: int
    reward_mean: float
    reward_std: float
    kl: float
    entropy: float
    policy_loss: float
    value_loss: float
    clipfrac: float
    approx_kl: float
    logprob_mismatch: float
    staleness: float
    samples_per_second: float
    generate_seconds: float
    score_seconds: float
    train_seconds: float
    push_seconds: float
    adapter_version: int
    kl_coef: float
    step_seconds: float
    peak_memory_gb: float
    mismatch_ratio_mean: float
    mismatch_ratio_max: float
    mismatch_masked_share: float
    mismatch_kl: float
    def __init__(self, step: _Optional[int] = ..., reward_mean: _Optional[float] = ..., reward_std: _Optional[float] = ..., kl: _Optional[float] = ..., entropy: _Optional[float] = ..., policy_loss: _Optional[float] = ..., value_loss: _Optional[float] = ..., clipfrac: _Optional[float] = ..., approx_kl: _Optional[float] = ..., logprob_mismatch: _Optional[float] = ..., staleness: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., generate_seconds: _Optional[float] = ..., score_seconds: _Optional[float] = ..., train_seconds: _Optional[float] = ..., push_seconds: _Optional[float] = ..., adapter_version: _Optional[int] = ..., kl_coef: _Optional[float] = ..., step_seconds: _Optional[float] = ..., peak_memory_gb: _Optional[float] = ..., mismatch_ratio_mean: _Optional[float] = ..., mismatch_ratio_max: _Optional[float] = ..., mismatch_masked_share: _Optional[float] = ..., mismatch_kl: _Optional[float] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "state", "config", "step", "adapter_version", "last_metrics", "message", "out_dir", "created_at", "updated_at")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUT_DIR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: RunState
    config: RunConfig
    step: int
    adapter_version: int
    last_metrics: StepMetrics
    message: str
    out_dir: str
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., step: _Optional[int] = ..., adapter_version: _Optional[int] = ..., last_metrics: _Optional[_Union[StepMetrics, _Mapping]] = ..., message: _Optional[str] = ..., out_dir: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StartRunRequest(_message.Message):
    __slots__ = ("run_id", "config")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    config: RunConfig
    def __init__(self, run_id: _Optional[str] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ...) -> None: ...

class StartRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class StopRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StopRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: Run
    def __init__(self, run: _Optional[_Union[Run, _Mapping]] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "from_step")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    from_step: int
    def __init__(self, run_id: _Optional[str] = ..., from_step: _Optional[int] = ...) -> None: ...

class RunEvent(_message.Message):
    __slots__ = ("kind", "time", "message", "state", "step")
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    kind: RunEventKind
    time: _timestamp_pb2.Timestamp
    message: str
    state: RunState
    step: int
    def __init__(self, kind: _Optional[_Union[RunEventKind, str]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., message: _Optional[str] = ..., state: _Optional[_Union[RunState, str]] = ..., step: _Optional[int] = ...) -> None: ...

class WatchRunResponse(_message.Message):
    __slots__ = ("metrics", "event")
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    metrics: StepMetrics
    event: RunEvent
    def __init__(self, metrics: _Optional[_Union[StepMetrics, _Mapping]] = ..., event: _Optional[_Union[RunEvent, _Mapping]] = ...) -> None: ...

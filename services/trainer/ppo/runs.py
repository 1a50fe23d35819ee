"""Runs started through TrainerService: one learner at a time, its state, and the history that
WatchRun replays. Run folders live under runs_dir/<run_id>; starting an existing id resumes it
from its last checkpoint.

A request is checked before anything is built (ppo/requests.py: names, paths under the allowed
roots, bounded numbers); the learner, which reads the prompts file, is built off the event loop.
A run that ends, however it ends, drops its learner (model, optimizer, channels) so a trainer
serving run after run keeps a flat memory footprint.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.plumbing.config import ConfigError
from rlhf.plumbing.errors import FailedPrecondition, InvalidArgument, NotFound
from rlhf.v1 import trainer_pb2
from services.trainer.config import TrainerConfig
from services.trainer.ppo.learner import Hooks, Learner
from services.trainer.ppo.metrics import TrainerMetrics, to_proto
from services.trainer.ppo.requests import (
    check_name,
    check_path,
    check_prompts_file,
    check_target_modules,
)
from services.trainer.ppo.settings import RESUME_POINTS, PPOSettings

log = logging.getLogger("rlhf.trainer.runs")
# Finished runs kept for GetRun/WatchRun; older ones are forgotten (their folders stay).
KEPT_FINISHED_RUNS = 100
ALGOS = {trainer_pb2.ALGORITHM_UNSPECIFIED: "ppo", trainer_pb2.ALGORITHM_PPO: "ppo",
         trainer_pb2.ALGORITHM_GRPO: "grpo", trainer_pb2.ALGORITHM_RLOO: "rloo"}
STATES = {"pending": trainer_pb2.RUN_STATE_PENDING, "running": trainer_pb2.RUN_STATE_RUNNING,
          "waiting": trainer_pb2.RUN_STATE_WAITING, "stopping": trainer_pb2.RUN_STATE_STOPPING,
          "stopped": trainer_pb2.RUN_STATE_STOPPED, "completed": trainer_pb2.RUN_STATE_COMPLETED,
          "failed": trainer_pb2.RUN_STATE_FAILED}
FINAL = {"stopped", "completed", "failed"}
EVENTS = {"checkpoint_saved": trainer_pb2.RUN_EVENT_KIND_CHECKPOINT_SAVED,
          "adapter_pushed": trainer_pb2.RUN_EVENT_KIND_ADAPTER_PUSHED,
          "push_failed": trainer_pb2.RUN_EVENT_KIND_PUSH_FAILED,
          "waiting": trainer_pb2.RUN_EVENT_KIND_WAITING,
          "state": trainer_pb2.RUN_EVENT_KIND_STATE_CHANGED}


def _ts(t: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


@dataclass
class RunRecord:
    run_id: str
    settings: PPOSettings
    state: str = "pending"
    step: int = 0
    version: int = 0
    message: str = ""
    last_metrics: dict | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    history: list = field(default_factory=list)  # WatchRunResponse messages, in order
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    learner: Learner | None = None  # while the run is being driven; dropped when it ends
    task: asyncio.Task | None = None
    stop_requested: bool = False

    def to_proto(self) -> trainer_pb2.Run:
        s = self.settings
        run = trainer_pb2.Run(
            run_id=self.run_id, state=STATES[self.state], step=self.step,
            adapter_version=self.version, message=self.message, out_dir=str(s.out),
            created_at=_ts(self.created), updated_at=_ts(self.updated),
            config=settings_to_proto(s),
        )
        if self.last_metrics is not None:
            run.last_metrics.CopyFrom(to_proto(self.last_metrics))
        return run


def settings_to_proto(s: PPOSettings) -> trainer_pb2.RunConfig:
    algo = {v: k for k, v in ALGOS.items() if k != trainer_pb2.ALGORITHM_UNSPECIFIED}[s.algo]
    return trainer_pb2.RunConfig(
        algorithm=algo, model=str(s.resolved_model()), init_adapter=str(s.init_adapter or ""),
        prompts_path=str(s.prompts or ""), steps=s.steps, prompts_per_step=s.prompts_per_step,
        samples_per_prompt=s.samples_per_prompt, max_new_tokens=s.max_new_tokens,
        temperature=s.temperature, learning_rate=s.learning_rate, ppo_epochs=s.ppo_epochs,
        minibatch_size=s.minibatch_size, clip_range=s.clip_range,
        clip_range_value=s.clip_range_value, gamma=s.gamma, lam=s.lam, kl_coef=s.kl_coef,
        target_kl=s.target_kl or 0.0, kl_estimator=s.kl_estimator, lora_rank=s.lora_rank,
        lora_alpha=s.lora_alpha, target_modules=s.target_modules, max_staleness=s.max_staleness,
        seed=s.seed, checkpoint_every=s.checkpoint_every, adapter_name=s.adapter_name,
        push_quorum=s.push_quorum, device=s.device, compute_dtype=s.compute_dtype,
        micro_batch_size=s.micro_batch_size or 0, gradient_checkpointing=s.gradient_checkpointing,
        report_to=s.report_to,
        loss_type=s.loss_type, clip_range_low=s.clip_bounds()[0],
        clip_range_high=s.clip_bounds()[1], mismatch_correction=s.mismatch_correction,
        mismatch_threshold=s.mismatch_threshold, dynamic_sampling=s.dynamic_sampling,
        max_refill_rounds=s.max_refill_rounds, overlong=s.overlong,
        overlong_buffer=s.overlong_buffer, overlong_penalty=s.overlong_penalty,
        eval_prompts_path=str(s.eval_prompts or ""), eval_every=s.eval_every,
        eval_samples=s.eval_samples, eval_temperature=s.eval_temperature,
        max_eval_drop=s.max_eval_drop,
        keep_checkpoints=s.keep_checkpoints, resume_from=s.resume_from,
        max_update_norm=s.max_update_norm, on_bad_step=s.on_bad_step,
        max_bad_steps=s.max_bad_steps, stage_seconds=s.stage_seconds,
        delivery_threshold=s.delivery_threshold or 0.0, delivery_samples=s.delivery_samples,
        promotion=s.promotion, canary_wait_seconds=s.canary_wait_seconds,
    )


def settings_from_proto(cfg: trainer_pb2.RunConfig, defaults: TrainerConfig,
                        run_id: str, policy_admin_token: str | None = None) -> PPOSettings:
    """A run's settings: the request's values over the trainer's configured defaults; the peers,
    their TLS and the policy's admin token always come from the trainer's config. Paths in the
    request must lie under the trainer's allowed roots; InvalidArgument names what is wrong."""
    missing = [key for key in ("policy_addr", "reward_addr") if not getattr(defaults, key)]
    if missing:
        raise InvalidArgument(
            f"this trainer has no {' and no '.join(missing)} configured (set "
            + ", ".join(f"--{k.replace('_', '-')} or {TrainerConfig.env_prefix()}{k.upper()}"
                        for k in missing)
            + "); it cannot start a run")
    check_name(run_id, "run_id")
    if cfg.algorithm not in ALGOS:
        raise InvalidArgument(f"algorithm {cfg.algorithm} is not one of the Algorithm values")
    roots = defaults.resolved_allowed_roots()
    values: dict = {"algo": ALGOS[cfg.algorithm]}
    if cfg.model:
        values["model"] = check_path(cfg.model, "model", roots, "dir")
    if cfg.init_adapter:
        values["init_adapter"] = check_path(cfg.init_adapter, "init_adapter", roots, "dir")
    if cfg.prompts_path:
        values["prompts"] = check_path(cfg.prompts_path, "prompts_path", roots, "file")
    if cfg.resume_from:
        values["resume_from"] = (cfg.resume_from if cfg.resume_from in RESUME_POINTS
                                 else str(check_path(cfg.resume_from, "resume_from", roots,
                                                     "dir")))
    if cfg.eval_prompts_path:
        values["eval_prompts"] = check_path(cfg.eval_prompts_path, "eval_prompts_path", roots,
                                            "file")
    for name in ("steps", "prompts_per_step", "samples_per_prompt", "max_new_tokens",
                 "ppo_epochs", "minibatch_size", "lora_rank", "checkpoint_every",
                 "micro_batch_size", "device", "compute_dtype", "loss_type",
                 "mismatch_correction", "overlong", "eval_every", "eval_samples",
                 "keep_checkpoints", "on_bad_step", "max_bad_steps", "stage_seconds",
                 "delivery_samples", "promotion"):
        if getattr(cfg, name):
            values[name] = getattr(cfg, name)
    for name in ("temperature", "learning_rate", "clip_range", "clip_range_value", "gamma",
                 "lam", "kl_coef", "lora_alpha", "max_staleness", "seed", "push_quorum",
                 "gradient_checkpointing", "clip_range_low", "clip_range_high",
                 "mismatch_threshold", "dynamic_sampling", "max_refill_rounds",
                 "overlong_buffer", "overlong_penalty", "eval_temperature", "max_eval_drop",
                 "max_update_norm", "canary_wait_seconds"):
        if cfg.HasField(name):
            values[name] = getattr(cfg, name)
    if cfg.HasField("delivery_threshold") and cfg.delivery_threshold != 0:
        # 0 (digests only) becomes None below; a negative or non-finite one is refused.
        values["delivery_threshold"] = cfg.delivery_threshold
    if cfg.HasField("target_kl") and cfg.target_kl != 0:
        values["target_kl"] = cfg.target_kl  # a negative or non-finite one is refused below
    if cfg.kl_estimator:
        values["kl_estimator"] = cfg.kl_estimator
    if cfg.report_to:
        values["report_to"] = cfg.report_to  # checked with the settings: names, packages
    if cfg.target_modules:
        values["target_modules"] = check_target_modules(cfg.target_modules)
    if cfg.adapter_name:
        values["adapter_name"] = check_name(cfg.adapter_name, "adapter_name")
    values.setdefault("model", defaults.model)
    values.setdefault("device", defaults.device)
    values.setdefault("prompts", defaults.prompts)
    if policy_admin_token is None:
        policy_admin_token = defaults.resolved_policy_admin_token()
    values.update(policy_addr=defaults.policy_addr, reward_addr=defaults.reward_addr,
                  client_tls=defaults.client_tls, admin_token=policy_admin_token,
                  out=defaults.resolved_runs_dir() / run_id)
    try:
        settings = PPOSettings.load(None, **{k: v for k, v in values.items() if v is not None})
        if cfg.HasField("delivery_threshold") and cfg.delivery_threshold == 0:
            settings = settings.model_copy(update={"delivery_threshold": None})
        settings.require_runnable()
    except ConfigError as exc:
        raise InvalidArgument(str(exc)) from None
    # A default adapter name would make every run of every trainer share one version line.
    check_name(settings.adapter_name, "adapter_name")
    return settings


class RunManager:
    def __init__(self, config: TrainerConfig):
        self.config = config
        self.runs: dict[str, RunRecord] = {}
        self.metrics = TrainerMetrics()
        self._policy_admin_token = config.resolved_policy_admin_token()
        # StartRun checks "one run at a time" and builds the learner off the loop: one at once.
        self._starting = asyncio.Lock()

    def get(self, run_id: str) -> RunRecord:
        record = self.runs.get(run_id)
        if record is None:
            raise NotFound(f"no run {run_id!r} on this trainer")
        return record

    def active(self) -> RunRecord | None:
        return next((r for r in self.runs.values() if r.state not in FINAL), None)

    async def start(self, run_id: str, cfg: trainer_pb2.RunConfig) -> RunRecord:
        run_id = run_id or time.strftime("run-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        check_name(run_id, "run_id")
        async with self._starting:
            busy = self.active()
            if busy is not None:
                raise FailedPrecondition(f"run {busy.run_id!r} is {busy.state}; one run trains "
                                         "at a time per trainer (StopRun it first)")
            settings = settings_from_proto(cfg, self.config, run_id, self._policy_admin_token)
            record = RunRecord(run_id, settings)
            try:
                record.learner = await asyncio.to_thread(self._build_learner, settings, record)
            except (ConfigError, ValueError, FileNotFoundError) as exc:
                raise InvalidArgument(f"cannot start run: {exc}") from None
            self.runs.pop(run_id, None)  # a resumed run's old record makes way
            self.runs[run_id] = record
            self._forget_old_runs()
            record.task = asyncio.create_task(self._drive(record))
        return record

    def _build_learner(self, settings: PPOSettings, record: RunRecord) -> Learner:
        """Blocking (reads the prompts file): runs in a worker thread."""
        check_prompts_file(settings.prompts, self.config.max_prompts_bytes)
        return Learner(settings, self._hooks(record))

    def _forget_old_runs(self) -> None:
        finished = [r for r in self.runs.values() if r.state in FINAL]
        for record in finished[:max(0, len(finished) - KEPT_FINISHED_RUNS)]:
            del self.runs[record.run_id]

    async def stop(self, run_id: str) -> RunRecord:
        record = self.get(run_id)
        if record.state not in FINAL and record.learner is not None:
            record.learner.stop_requested = True
            self._set_state(record, "stopping", "stopping after the current step")
        return record

    async def stop_all(self) -> None:
        for record in list(self.runs.values()):
            if record.task is not None and not record.task.done():
                if record.learner is not None:
                    record.learner.stop_requested = True
                record.task.cancel()
                try:
                    await record.task
                except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                    pass

    async def _drive(self, record: RunRecord) -> None:
        self._set_state(record, "running", "")
        try:
            await record.learner.run()
        except asyncio.CancelledError:
            self._set_state(record, "stopped", "trainer shut down; resumable")
            raise
        except Exception as exc:  # noqa: BLE001 - the run fails, the service keeps serving
            log.exception("run %s failed", record.run_id)
            self._set_state(record, "failed", f"{type(exc).__name__}: {exc}")
            return
        finally:
            await self._release(record)
        if record.stop_requested:
            self._set_state(record, "stopped", "stopped on request; resumable")
        else:
            self._set_state(record, "completed", "")

    async def _release(self, record: RunRecord) -> None:
        """Drops the run's learner, and with it the model, optimizer and the (closed) clients;
        the run's figures stay on the record."""
        learner, record.learner = record.learner, None
        if learner is None:
            return
        record.step = max(record.step, learner.step)
        record.version = max(record.version, learner.version)
        record.stop_requested = learner.stop_requested
        if learner.services is not None and not learner.services.policy.closed:
            await learner.services.close()
        del learner
        # The model's tensors sit in reference cycles (modules <-> hooks): collect them now,
        # not whenever the collector next runs.
        await asyncio.to_thread(gc.collect)

    # ------------------------------------------------------------------ hooks

    def _publish(self, record: RunRecord, update: trainer_pb2.WatchRunResponse) -> None:
        record.updated = time.time()
        record.history.append(update)

        async def notify():
            async with record.changed:
                record.changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _set_state(self, record: RunRecord, state: str, message: str) -> None:
        if record.state == state and record.message == message:
            return
        if record.state == "stopping" and state in ("running", "waiting"):
            return
        record.state, record.message = state, message
        if record.learner is not None:
            record.step = max(record.step, record.learner.step)
            record.version = max(record.version, record.learner.version)
        self.metrics.waiting.set(1 if state == "waiting" else 0)
        kind = "waiting" if state == "waiting" else "state"
        self._publish(record, trainer_pb2.WatchRunResponse(event=trainer_pb2.RunEvent(
            kind=EVENTS[kind], time=_ts(time.time()), message=message, state=STATES[state],
            step=record.step)))

    def _hooks(self, record: RunRecord) -> Hooks:
        def on_metrics(metrics: dict) -> None:
            record.step, record.version = metrics["step"], metrics["adapter/version"]
            record.last_metrics = metrics
            self.metrics.record(metrics)
            self._publish(record, trainer_pb2.WatchRunResponse(metrics=to_proto(metrics)))

        def on_event(kind: str, message: str) -> None:
            if kind == "push_failed":
                self.metrics.push_failures.inc()
            self._publish(record, trainer_pb2.WatchRunResponse(event=trainer_pb2.RunEvent(
                kind=EVENTS[kind], time=_ts(time.time()), message=message,
                state=STATES[record.state], step=record.step)))

        def on_state(state: str, message: str) -> None:
            self._set_state(record, state, message)

        return Hooks(on_metrics=on_metrics, on_event=on_event, on_state=on_state)

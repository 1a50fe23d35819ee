"""The learner loop, one step at a time, reading like the algorithm:

    prompts -> Generate on the policy (n per prompt, logprobs) -> Score on the reward service
    -> the update on the scored rollouts (ppo/update.py) -> checkpoint (every checkpoint_every
    steps, and after the last) -> push adapter v+1 to every policy replica

With max_staleness >= 1, generation for step k+1 starts before step k trains (on the adapter
version then served), so the two overlap; each rollout carries the version that produced it, and
rollouts more than max_staleness versions behind are thrown away and regenerated.

The model, batches, losses and advantages live on `settings.device` (CUDA when available with the
default `auto`; under torchrun each rank takes cuda:$LOCAL_RANK).

Under torchrun (services/trainer/distributed.py) rank 0 alone talks to the services: it generates
and scores the whole global batch, sends it to the other ranks, and alone writes checkpoints and
metrics and pushes adapters. Every rank computes the forward and backward passes of its share of
the rows; gradients are summed over the ranks before each optimizer step, so all ranks hold the
same weights and the update equals one process's on the same global batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf.clients import CallFailed
from rlhf.files import atomic_write
from rlhf.formats import base_model_fingerprint
from rlhf.plumbing.cpus import parse_cpu_list, pin_process
from services.trainer import rl_math
from services.trainer.clients import Sample, Services
from services.trainer.data import read_prompts
from services.trainer.distributed import World, resolve_device, world
from services.trainer.ppo import checkpoint, delivery, gates, sampling
from services.trainer.ppo.actor_critic import ActorCritic
from services.trainer.ppo.canary_watch import CanaryWatch
from services.trainer.ppo.evaluation import Evaluation
from services.trainer.ppo.settings import PPOSettings
from services.trainer.ppo.update import Update
from services.trainer.tracking import Tracker, open_tracker, settings_config

log = logging.getLogger("rlhf.trainer")


# The adapter pushed after a step that writes no checkpoint (checkpoint_every > 1).
LATEST_ADAPTER = "latest-adapter"


@dataclass
class Rollouts:
    samples: list[Sample]
    generate_seconds: float
    score_seconds: float
    figures: dict = field(default_factory=dict)  # sampling/* (ppo/sampling.py)
    cursor: dict = field(default_factory=dict)  # the data cursor just after these prompts


@dataclass
class Hooks:
    """How a run reports: metrics per step, events, and the waiting state."""

    on_metrics: Callable[[dict], None] = lambda m: None
    on_event: Callable[[str, str], None] = lambda kind, message: None
    on_state: Callable[[str, str], None] = lambda state, message: None


@dataclass
class DataCursor:
    """Where the run is in its prompt stream: epoch and index into that epoch's order."""

    epoch: int = 0
    index: int = 0
    order: list[int] = field(default_factory=list)

    def take(self, n: int, total: int, seed: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if not self.order or self.index >= len(self.order):
                if self.order:
                    self.epoch += 1
                self.order = list(range(total))
                random.Random(seed * 1_000_003 + self.epoch).shuffle(self.order)
                self.index = 0
            picked.append(self.order[self.index])
            self.index += 1
        return picked

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "order": list(self.order)}


class Learner:
    def __init__(self, settings: PPOSettings, hooks: Hooks | None = None,
                 world_: World | None = None):
        settings.require_runnable()
        self.s = settings
        self.hooks = hooks or Hooks()
        self.world = world_ or world()
        # A device this machine lacks is a ConfigError now, not a CUDA error mid-run.
        self.device = resolve_device(settings.device, self.world)
        self.out = Path(settings.out)
        self.prompts = read_prompts(settings.prompts)
        self.evaluation = Evaluation.from_settings(settings)  # None without eval_prompts
        self._eval_figures: dict = {}  # the latest evaluation's, for the next metrics line
        # Served digests and the first rollouts of each version against what was pushed.
        self.delivery = delivery.DeliveryCheck(settings.delivery_threshold,
                                               settings.delivery_samples)
        self._push_figures: dict = {}  # the latest push's replica counts (push/*)
        self._delivery_figures: dict = {}  # the latest delivery verdict (delivery/*)
        self.canary_watch: CanaryWatch | None = None  # promotion canary: staged versions' fate
        self.stop_requested = False
        self.step = 0
        self.version = 0  # adapter version the policy serves for this run (0 = none yet)
        self.cursor = DataCursor()
        # The cursor after the prompts of the last trained step: what a checkpoint saves, so a
        # resumed run redraws the prompts of rollouts that were prefetched but not trained.
        self.trained_cursor: dict | None = None
        self.services: Services | None = None
        self.model: ActorCritic | None = None
        self.update: Update | None = None
        self.saved_step = 0  # the step of the newest checkpoint
        self.bad_steps = 0  # steps in a row that failed their gates (ppo/gates.py)
        # Checkpoints by the version they hold, until that version is promoted (last_good).
        self.checkpoint_of: dict[int, Path] = {}
        # Rank 0 checks the checkpoint `resume_from` names now: a missing one is a ConfigError
        # before anything is built.
        self.resume_from = (checkpoint.resume_folder(self.out, settings.resume_point())
                            if self.world.is_main and settings.resume_from != "last" else None)
        self._last_metrics: dict | None = None
        self._mid_update = False  # inside a step's collectives (a failure there ends all ranks)
        self.tracker = Tracker()  # rank 0 opens the settings' trackers when the run starts

    # ------------------------------------------------------------------ set-up and resume

    def _build(self) -> None:
        s = self.s
        # The same seed on every rank: the LoRA init and the minibatch order must agree across
        # ranks. Sampling needs no per-rank seed: rank 0 alone samples, through the policy.
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        self.model = ActorCritic(s.resolved_model(), lora_rank=s.lora_rank,
                                 lora_alpha=s.lora_alpha, target_modules=s.target_modules,
                                 with_critic=s.algo == "ppo", init_adapter=s.init_adapter,
                                 compute_dtype=s.compute_dtype, device=self.device,
                                 gradient_checkpointing=s.gradient_checkpointing,
                                 shard_base=s.shard_base)
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=s.learning_rate)
        # The KL coefficient is a Python float: it is read on the host to scale the penalty,
        # whatever the device.
        self.kl_ctl = (rl_math.AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon)
                       if s.target_kl else rl_math.FixedKLController(s.kl_coef))
        self.update = Update(s, self.model, self.optimizer, self.kl_ctl, self.world)

    def _resume(self) -> Path | None:
        # Rank 0 picks the checkpoint and every rank loads that one (the run folder is on the
        # node's disk); then the weights are synchronised from rank 0, as DDP does at start.
        chosen = None
        if self.world.is_main:
            chosen = self.resume_from or checkpoint.pick(self.out)
            if chosen is not None:
                checkpoint.abandon_after(self.out, chosen)
        folder = self.world.broadcast_object(chosen)
        if folder is not None:
            state = checkpoint.load(folder, model=self.model, optimizer=self.optimizer)
            self.step = self.saved_step = state["step"]
            self.version = state["version"]
            self.cursor = DataCursor(**state["cursor"])
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            if self.world.is_main:
                self._rewrite_metrics(state.get("metrics"))
            log.info("resumed from %s at step %d (adapter v%d)", folder, self.step,
                     self.version)
        self.world.broadcast_params(self.model.trainable_parameters())
        return folder

    def _rewrite_metrics(self, last: dict | None) -> None:
        """metrics.jsonl keeps exactly one line per checkpointed step: lines past the checkpoint
        (a step that was not saved) go, and the checkpoint's own line comes back if missing. A
        torn line (a crash mid-append) is dropped with a warning."""
        path = self.out / "metrics.jsonl"
        kept = [row for row in checkpoint.metrics_rows(path) if row["step"] <= self.step]
        if last is not None and not any(row["step"] == self.step for row in kept):
            kept.append(last)
        atomic_write(path, "".join(json.dumps(row) + "\n" for row in kept))

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        s = self.s
        if s.cpu_cores:
            cores = parse_cpu_list(s.cpu_cores)
            pin_process(cores)
            torch.set_num_threads(len(cores))
        if not self.world.is_main:
            await asyncio.to_thread(self._build)
            await asyncio.to_thread(self._resume)
            await asyncio.to_thread(self._follow)
            return
        self.out.mkdir(parents=True, exist_ok=True)
        self.services = Services(
            s.policy_addr, s.reward_addr, s.adapter_name, tls=s.client_tls,
            timeout=s.rpc_timeout_seconds, retry_max=s.retry_max_seconds,
            on_wait=lambda msg: self.hooks.on_state("waiting", msg),
            on_recover=lambda: self.hooks.on_state("running", ""),
        )
        if s.promotion == "canary":
            self.canary_watch = CanaryWatch(self.services.policy, s.adapter_name,
                                            s.canary_gateway_url, s.canary_gateway_key)
        try:
            if s.delivery_threshold is not None:
                await self._skip_logprob_check_on_fake_engines()
            await asyncio.to_thread(self._build)
            resumed = await asyncio.to_thread(self._resume)
            self.tracker = await asyncio.to_thread(
                open_tracker, s.report_to, self.out, settings_config(s),
                start_step=self.step + 1)
            try:
                await self._lead(resumed)
            finally:
                if self.world.size > 1 and not self._mid_update:
                    # The other ranks wait for the next batch: tell them the run is over (also
                    # when this rank failed between steps, so they exit instead of timing out).
                    await asyncio.to_thread(self.world.broadcast_object, None)
        finally:
            await asyncio.to_thread(self.tracker.close)
            await self.services.close()

    async def _lead(self, resumed: Path | None) -> None:
        """Rank 0 (the only rank of a plain run): rollouts, training steps, checkpoints, pushes."""
        s = self.s
        # The id and fingerprint of this learner's own base: a policy serving another base
        # refuses the push, also one whose folder has the same name.
        self.base_model_id = s.resolved_base_model_id()
        self.base_model_fingerprint = await asyncio.to_thread(base_model_fingerprint,
                                                              s.resolved_model())
        if self.evaluation is not None:
            # The promoted version's eval figures: what users are served, whatever checkpoint
            # the run resumes from.
            await asyncio.to_thread(self.evaluation.restore, self.out)
        if resumed is not None:
            newest = await self.services.newest_version()
            if newest > self.version:
                # Steps after the checkpoint were pushed (checkpoint_every > 1) and are done
                # again: the checkpoint's weights take a new number, as a replica never takes a
                # version number twice.
                self.version = newest + 1
            # The checkpoint is written before the push, so its adapter may never have reached
            # the replicas: push it again (an identical re-push is a no-op there).
            self.checkpoint_of[self.version] = resumed
            await self._push(resumed / "policy", self.version)
        else:
            # Version numbers keep increasing across runs that share an adapter name; the
            # starting weights (fresh LoRA = base, or the SFT adapter) are pushed first so every
            # rollout, the first included, comes from a pinned, known version.
            self.version = await self.services.newest_version() + 1
            initial = await asyncio.to_thread(self.model.save_policy_adapter,
                                              self.out / "initial-adapter")
            await self._push(initial, self.version)
        self.hooks.on_state("running", "")
        pending: asyncio.Task | None = None
        try:
            while self.step < s.steps and not self.stop_requested:
                if pending is None:
                    pending = asyncio.create_task(self._rollouts())
                rollouts = await pending
                pending = None
                stale = [self.version - smp.adapter_version for smp in rollouts.samples]
                if max(stale) > s.max_staleness:
                    log.info("dropping rollouts %d versions old (max_staleness=%d)", max(stale),
                             s.max_staleness)
                    continue
                await self._check_delivery(rollouts)
                if s.max_staleness >= 1 and self.step + 1 < s.steps:
                    # Overlap: the next batch is generated by the current version while this one
                    # trains; it will be at most one version stale.
                    pending = asyncio.create_task(self._rollouts())
                await self._train_step(rollouts, stale)
        finally:
            if pending is not None:
                pending.cancel()
        if self.step > self.saved_step:  # stopped between steps, after one with no checkpoint
            folder = await asyncio.to_thread(self._checkpoint, self._last_metrics)
            self.hooks.on_event("checkpoint_saved", str(folder))

    async def _rollouts(self) -> Rollouts:
        """The step's scored batch, with dynamic sampling's refills (ppo/sampling.py); every
        draw samples the version served when the batch started."""
        s = self.s
        version = self.version
        seconds = {"generate": 0.0, "score": 0.0}

        async def draw(n: int) -> list[Sample]:
            idx = self.cursor.take(n, len(self.prompts), s.seed)
            records = [self.prompts[i] for i in idx]
            start = time.perf_counter()
            seed = s.seed * 100_003 + self.cursor.epoch * 10_007 + self.cursor.index
            samples = await self.services.generate(records, s.samples_per_prompt,
                                                   s.max_new_tokens, s.temperature, seed, version)
            generated = time.perf_counter()
            scores = await self.services.score(records, samples)
            for smp, score in zip(samples, scores, strict=True):
                smp.score = score
            seconds["generate"] += generated - start
            seconds["score"] += time.perf_counter() - generated
            return samples

        batch = await sampling.collect(draw, s)
        return Rollouts(batch.samples, seconds["generate"], seconds["score"], batch.figures(),
                        self.cursor.state())

    async def _train_step(self, rollouts: Rollouts, stale: list[int]) -> None:
        s = self.s
        start = time.perf_counter()
        self._mid_update = True
        stats = await asyncio.to_thread(self._update_all, rollouts.samples)
        self._mid_update = False
        trained = time.perf_counter()
        self.step += 1
        passed = not stats["gate/failed"]
        if passed:  # a failed step was rolled back: the weights are still this version's
            self.version += 1
        self.trained_cursor = rollouts.cursor
        metrics = {
            "step": self.step,
            **stats,
            **rollouts.figures,
            "adapter/version": self.version,
            "adapter/staleness": sum(stale) / len(stale),
            "kl/coef": self.kl_ctl.value,
            "time/generate": rollouts.generate_seconds,
            "time/score": rollouts.score_seconds,
            "time/train": trained - start,
        }
        # Which reward model scored the step, so a change of reward scale is visible.
        reward_versions = sorted({smp.reward_version for smp in rollouts.samples} - {""})
        if reward_versions:
            metrics["reward/model_version"] = ",".join(reward_versions)
        self._last_metrics = metrics
        if not passed:
            await self._bad_step(metrics, rollouts, trained - start)
            return
        self.bad_steps = 0
        # An evaluated version is always checkpointed: the best by eval can then be kept.
        if (self.step % s.checkpoint_every == 0 or self.step >= s.steps or self.stop_requested
                or self._eval_due()):
            folder = await asyncio.to_thread(self._checkpoint, metrics)
            self.hooks.on_event("checkpoint_saved", str(folder))
            adapter = folder / "policy"
        else:
            adapter = await asyncio.to_thread(self.model.save_policy_adapter,
                                              self.out / LATEST_ADAPTER)
        push_start = time.perf_counter()
        await self._push(adapter, self.version)
        metrics["time/push"] = time.perf_counter() - push_start
        metrics.update(self._eval_figures)
        metrics.update(self._push_figures)
        metrics.update(self._delivery_figures)
        metrics.update(await self._canary_verdicts())
        self._eval_figures = {}
        self._delivery_figures = {}
        total = rollouts.generate_seconds + rollouts.score_seconds + (metrics["time/push"]
                                                                      + trained - start)
        metrics["time/step"] = total
        metrics["throughput/samples_per_s"] = len(rollouts.samples) / total if total else 0.0
        self._append_metrics(metrics)
        self.hooks.on_metrics(metrics)

    async def _bad_step(self, metrics: dict, rollouts: Rollouts, train_seconds: float) -> None:
        """A step that failed its gates: its weights and optimizer state were rolled back
        (ppo/update.py) and its batch is dropped; nothing is checkpointed or pushed, its metrics
        line says why. Under on_bad_step stop, max_bad_steps such steps in a row end the run."""
        s = self.s
        self.bad_steps += 1
        total = rollouts.generate_seconds + rollouts.score_seconds + train_seconds
        metrics.update({"time/push": 0.0, "time/step": total,
                        "throughput/samples_per_s": len(rollouts.samples) / total if total
                        else 0.0})
        metrics = self._last_metrics = gates.finite_only(metrics)
        log.warning("step %d failed its gates (%d in a row), rolled back, not pushed: %s",
                    self.step, self.bad_steps, metrics["gate/reason"])
        self._append_metrics(metrics)
        self.hooks.on_metrics(metrics)
        if s.on_bad_step == "stop" and self.bad_steps >= s.max_bad_steps:
            raise gates.GateFailed(
                f"step {self.step} failed its gates ({metrics['gate/reason']}); "
                f"{self.bad_steps} failed step(s) in a row (max_bad_steps {s.max_bad_steps}), so "
                f"the run stops; adapter v{self.version} is the last one pushed")

    def _checkpoint(self, metrics: dict | None) -> Path:
        state = {"version": self.version, "kl_ctl": self.kl_ctl.state_dict(), "metrics": metrics,
                 "cursor": self.trained_cursor or self.cursor.state()}
        folder = checkpoint.save(self.out, self.step, model=self.model, optimizer=self.optimizer,
                                 state=state, keep=self.s.keep_checkpoints)
        self.saved_step = self.step
        self.checkpoint_of[self.version] = folder
        return folder

    def _append_metrics(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        self.tracker.log(metrics, metrics["step"])

    async def _push(self, folder: Path, version: int) -> None:
        """Stages `version` on every replica (loaded, servable pinned, not to users: with fewer
        than push_quorum staged none keeps it and GaveUp ends the run), asks promotion_check,
        then activates it on every replica that staged it, or keeps it inactive there (the next
        rollouts are pinned to it). Replicas that missed the activation after the bounded
        retries are logged, counted (push/missed_replicas, rlhf_trainer_push_missed_replicas)
        and told as push_failed events."""
        s = self.s
        canary = s.promotion == "canary"
        stage_seconds = s.stage_seconds + (int(s.canary_wait_seconds) if canary else 0)
        result = await self.services.stage(
            folder, version, self.base_model_id, s.admin_token, s.push_quorum, stage_seconds,
            base_model_fingerprint=self.base_model_fingerprint)
        for endpoint, error in result.refused.items():
            self.hooks.on_event("push_failed", f"v{version} on {endpoint}: {error}")
        log.info("v%d staged on %s", version, ", ".join(result.confirmed))
        weights = (await asyncio.to_thread(delivery.policy_weights, self.model)
                   if s.delivery_threshold is not None else None)
        self.delivery.pushed(version, result.sha256, weights)
        promote, _ = await self.promotion_check(version)
        self._push_figures = {"push/staged_replicas": len(result.confirmed),
                              "push/refused_replicas": len(result.refused)}
        if not promote:
            # Refused by the eval gate: never offered to users, canary or not.
            for endpoint, error in (await self.services.keep(result, s.admin_token)).items():
                log.warning("v%d could not be kept inactive on %s: %s", version, endpoint, error)
            return
        if canary:
            # Hand-over: the gateway's canary activates the staged version (promoted) or drops
            # it (rolled back); the replicas drop it by themselves after stage_seconds.
            self.hooks.on_event("adapter_pushed", f"v{version} staged for the canary on "
                                f"{', '.join(result.confirmed)}")
            if self.canary_watch is not None:
                self.canary_watch.handed(version)
            return
        await self.services.commit(result, s.admin_token)
        self._push_figures.update({"push/activated_replicas": len(result.activated),
                                   "push/missed_replicas": len(result.missed)})
        delivery.MISSED_GAUGE.set(len(result.missed))
        for endpoint, error in result.missed.items():
            log.error("v%d was staged on %s but its activation failed after retries: %s",
                      version, endpoint, error)
            self.hooks.on_event("push_failed",
                                f"v{version} on {endpoint}: activation missed: {error}")
        self.hooks.on_event("adapter_pushed",
                            f"v{version} active on {', '.join(result.activated) or 'no replica'}")
        if result.activated:
            await asyncio.to_thread(self._mark_promoted, version)

    async def _skip_logprob_check_on_fake_engines(self) -> None:
        # The fake engine's logprobs come from no model, so comparing them with the learner's
        # says nothing; the digest check still runs.
        engines = await self.services.policy_engines()
        if any(engine.startswith("fake") for engine in engines):
            log.info("the policy runs the fake engine (%s): the delivery check compares "
                     "digests only", ", ".join(sorted(engines)))
            self.delivery.threshold = None

    async def _check_delivery(self, rollouts: Rollouts) -> None:
        """Raises NotDelivered (the rollouts are not trained on) when a replica served other
        weights than the learner pushed: a digest that differs, or the first rollouts of a
        version whose logprobs differ from the learner's by more than delivery_threshold."""
        # A pass on rank 0 alone: not with a base sharded over the ranks (a collective).
        alone = not (self.s.shard_base and self.world.size > 1)
        compare = ((lambda samples, weights: delivery.learner_logprobs(self.model, samples,
                                                                       weights))
                   if alone else None)
        verdicts = await asyncio.to_thread(self.delivery.judge, rollouts.samples, compare)
        if not verdicts:
            return
        self._delivery_figures = verdicts[0].figures()
        if verdicts[0].ok:
            return
        bad = verdicts[0]
        row = {"step": self.step + 1, "adapter/version": self.version, **bad.figures()}
        self._append_metrics(gates.finite_only(row))
        self.hooks.on_event("push_failed", f"not delivered as trained: {bad.reason}")
        raise delivery.NotDelivered(
            f"adapter v{bad.version} is not delivered as trained ({bad.reason}); its rollouts "
            "were refused and the run stops: check the replicas (ListAdapters, logs)")

    def _mark_promoted(self, version: int) -> None:
        """`version` serves users: its checkpoint (if the step wrote one) becomes last_good."""
        folder = self.checkpoint_of.get(version)
        for older in [v for v in self.checkpoint_of if v <= version]:
            del self.checkpoint_of[older]
        if folder is not None and folder.is_dir() and checkpoint.mark_last_good(self.out, folder):
            # The previous last_good was kept only as that; past keep_checkpoints it goes now.
            checkpoint.prune(self.out, self.s.keep_checkpoints)

    def _eval_due(self) -> bool:
        return self.evaluation is not None and self.evaluation.due(self.step,
                                                                   self.stop_requested)

    async def _canary_verdicts(self) -> dict:
        """promotion canary: the gateway's verdicts on staged versions reached since the last
        step (ppo/canary_watch.py), as canary/* figures and canary_* events."""
        if self.canary_watch is None:
            return {}
        try:
            outcomes = await self.canary_watch.poll()
        except CallFailed as exc:
            log.warning("canary verdicts not read this step: %s", exc)
            return {}
        figures: dict = {}
        for o in outcomes:
            figures[f"canary/{o.decision}_version"] = o.version
            if o.decision == "rolled_back":
                figures["canary/reason"] = o.reason
            log.warning("v%d %s by the canary: %s", o.version, o.decision.replace("_", " "),
                        o.reason)
            self.hooks.on_event(f"canary_{o.decision}", f"v{o.version}: {o.reason}")
        return figures

    async def promotion_check(self, version: int) -> tuple[bool, str]:
        """Whether `version`, on the replicas but not yet active, may be activated for users:
        when evaluation is due it generates on the eval prompts with `version` pinned and is
        scored (ppo/evaluation.py), then `should_promote` decides against the promoted
        version's eval reward. The figures and the reason go into the step's metrics line.
        Without eval_prompts, or without max_eval_drop, every version passes."""
        if self.evaluation is None:
            return True, "no evaluation (eval_prompts unset)"
        promoted = self.evaluation.promoted
        if promoted is not None and promoted.version == version:
            return True, f"v{version} is the promoted version"  # a resumed run's re-push
        due = self._eval_due()
        if not due and not self.evaluation.gated:
            return True, "no eval gate (max_eval_drop unset)"
        candidate = await self.evaluation.run(self.services, version) if due else None
        promote, reason, self._eval_figures = self.evaluation.decide(candidate)
        if promote and candidate is not None:
            await asyncio.to_thread(self.evaluation.save, self.out)
        if candidate is not None and self.step > 0:
            # The step's checkpoint is written before its push (evaluated steps always write
            # one): it becomes the best when its eval reward beats the best's.
            await asyncio.to_thread(checkpoint.mark_best, self.out, self.step,
                                    candidate.reward_mean)
        if not promote:
            (log.warning if candidate is not None else log.info)(
                "v%d is not promoted: %s", version, reason)
        return promote, reason

    # ------------------------------------------------------------------ the update (a thread)

    def _update_all(self, samples: list[Sample]) -> dict:
        """Rank 0: hand the step's global batch to the other ranks, then update with them."""
        self.world.broadcast_object(samples)
        return self.update(samples)

    def _follow(self) -> None:
        """Ranks > 0: take part in every step rank 0 trains, until it says the run is over."""
        while (samples := self.world.broadcast_object()) is not None:
            self.update(samples)
            self.step += 1

"""The learner loop, one step at a time, reading like the algorithm:

    prompts -> Generate on the policy (n per prompt, logprobs) -> Score on the reward service
    -> reference logprobs (adapters off) -> critic values -> KL-shaped per-token rewards
    -> advantages (GAE, or group-relative for GRPO / leave-one-out for RLOO)
    -> PPO epochs over minibatches -> checkpoint -> push adapter v+1 to every policy replica

With max_staleness >= 1, generation for step k+1 starts before step k trains (on the adapter
version then served), so the two overlap; each rollout carries the version that produced it, and
rollouts more than max_staleness versions behind are thrown away and regenerated.

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

from rlhf.plumbing.cpus import parse_cpu_list, pin_process
from services.trainer import checkpoint
from services.trainer import ppo_math as pm
from services.trainer.actor_critic import ActorCritic, Batch, make_batch
from services.trainer.clients import Sample, Services
from services.trainer.distributed import World, world
from services.trainer.jsonl import read_prompts
from services.trainer.settings import RunSettings

log = logging.getLogger("rlhf.trainer")


@dataclass
class Rollouts:
    samples: list[Sample]
    records: list
    generate_seconds: float
    score_seconds: float


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


class Learner:
    def __init__(self, settings: RunSettings, hooks: Hooks | None = None,
                 world_: World | None = None):
        settings.require_runnable()
        self.s = settings
        self.hooks = hooks or Hooks()
        self.world = world_ or world()
        self.out = Path(settings.out)
        self.prompts = read_prompts(settings.prompts)
        self.stop_requested = False
        self.step = 0
        self.version = 0  # adapter version the policy serves for this run (0 = none yet)
        self.cursor = DataCursor()
        self.services: Services | None = None
        self.model: ActorCritic | None = None
        self._mid_update = False  # inside a step's collectives (a failure there ends all ranks)

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
                                 compute_dtype=s.compute_dtype)
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=s.learning_rate)
        self.kl_ctl = (pm.AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon)
                       if s.target_kl else pm.FixedKLController(s.kl_coef))

    def _resume(self) -> Path | None:
        # Rank 0 picks the checkpoint and every rank loads that one (the run folder is on the
        # node's disk); then the weights are synchronised from rank 0, as DDP does at start.
        latest = checkpoint.latest(self.out) if self.world.is_main else None
        folder = self.world.broadcast_object(latest)
        if folder is not None:
            state = checkpoint.load(folder, model=self.model, optimizer=self.optimizer)
            self.step = state["step"]
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
        (a step that was not saved) go, and the checkpoint's own line comes back if missing."""
        path = self.out / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= self.step]
        if last is not None and not any(json.loads(ln)["step"] == self.step for ln in kept):
            kept.append(json.dumps(last))
        path.write_text("".join(ln + "\n" for ln in kept))

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
            s.policy_addr, s.reward_addr, s.adapter_name, timeout=s.rpc_timeout_seconds,
            retry_max=s.retry_max_seconds,
            on_wait=lambda msg: self.hooks.on_state("waiting", msg),
            on_recover=lambda: self.hooks.on_state("running", ""),
        )
        await asyncio.to_thread(self._build)
        resumed = await asyncio.to_thread(self._resume)
        try:
            await self._lead(resumed)
        finally:
            if self.world.size > 1 and not self._mid_update:
                # The other ranks wait for the next batch: tell them the run is over (also when
                # this rank failed between steps, so they exit instead of timing out).
                await asyncio.to_thread(self.world.broadcast_object, None)

    async def _lead(self, resumed: Path | None) -> None:
        """Rank 0 (the only rank of a plain run): rollouts, training steps, checkpoints, pushes."""
        s = self.s
        self.base_model_id = await self.services.base_model_id()
        if resumed is not None:
            # The checkpoint is written before the push, so its adapter may never have reached
            # the replicas: push it again (an identical re-push is a no-op there).
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
            if s.max_staleness >= 1 and self.step + 1 < s.steps:
                # Overlap: the next batch is generated by the current version while this one
                # trains; it will be at most one version stale.
                pending = asyncio.create_task(self._rollouts())
            await self._train_step(rollouts, stale)
        if pending is not None:
            pending.cancel()

    async def _rollouts(self) -> Rollouts:
        s = self.s
        idx = self.cursor.take(s.prompts_per_step, len(self.prompts), s.seed)
        records = [self.prompts[i] for i in idx]
        start = time.perf_counter()
        seed = s.seed * 100_003 + self.cursor.epoch * 10_007 + self.cursor.index
        samples = await self.services.generate(records, s.samples_per_prompt, s.max_new_tokens,
                                               s.temperature, seed, self.version)
        generated = time.perf_counter()
        scores = await self.services.score(records, samples)
        for smp, score in zip(samples, scores, strict=True):
            smp.score = score
        return Rollouts(samples, records, generated - start, time.perf_counter() - generated)

    async def _train_step(self, rollouts: Rollouts, stale: list[int]) -> None:
        start = time.perf_counter()
        self._mid_update = True
        stats = await asyncio.to_thread(self._update_all, rollouts.samples)
        self._mid_update = False
        trained = time.perf_counter()
        self.step += 1
        version = self.version + 1
        metrics = {
            "step": self.step,
            **stats,
            "staleness": sum(stale) / len(stale),
            "generate_seconds": rollouts.generate_seconds,
            "score_seconds": rollouts.score_seconds,
            "train_seconds": trained - start,
            "adapter_version": version,
            "kl_coef": self.kl_ctl.value,
        }
        folder = await asyncio.to_thread(self._checkpoint, version, metrics)
        self.hooks.on_event("checkpoint_saved", str(folder))
        push_start = time.perf_counter()
        await self._push(folder / "policy", version)
        metrics["push_seconds"] = time.perf_counter() - push_start
        total = rollouts.generate_seconds + rollouts.score_seconds + (metrics["push_seconds"]
                                                                      + trained - start)
        metrics["step_seconds"] = total
        metrics["samples_per_second"] = len(rollouts.samples) / total if total else 0.0
        self._append_metrics(metrics)
        self.hooks.on_metrics(metrics)

    def _checkpoint(self, version: int, metrics: dict) -> Path:
        self.version = version
        state = {"version": version, "kl_ctl": self.kl_ctl.state_dict(), "metrics": metrics,
                 "cursor": {"epoch": self.cursor.epoch, "index": self.cursor.index,
                            "order": self.cursor.order}}
        return checkpoint.save(self.out, self.step, model=self.model, optimizer=self.optimizer,
                               state=state, keep=self.s.keep_checkpoints)

    def _append_metrics(self, metrics: dict) -> None:
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")

    async def _push(self, folder: Path, version: int) -> None:
        result = await self.services.push(folder, version, self.base_model_id,
                                          self.s.admin_token, self.s.push_quorum)
        for endpoint, error in result.refused.items():
            self.hooks.on_event("push_failed", f"v{version} on {endpoint}: {error}")
        self.hooks.on_event("adapter_pushed",
                            f"v{version} confirmed by {', '.join(result.confirmed)}")

    # ------------------------------------------------------------------ the update (a thread)

    def _update_all(self, samples: list[Sample]) -> dict:
        """Rank 0: hand the step's global batch to the other ranks, then update with them."""
        self.world.broadcast_object(samples)
        return self._update(samples)

    def _follow(self) -> None:
        """Ranks > 0: take part in every step rank 0 trains, until it says the run is over."""
        while (samples := self.world.broadcast_object()) is not None:
            self._update(samples)
            self.step += 1

    def _sharded(self, fn, batch: Batch, rows: list[int], outputs: int = 1
                 ) -> list[torch.Tensor]:
        """fn(batch) -> `outputs` tensors [B, T], each rank computing fn on its `rows` only and
        every rank getting the whole result (one process: fn(batch) itself)."""
        world = self.world
        if world.size == 1:
            out = fn(batch)
        elif rows:
            out = fn(batch.rows(torch.tensor(rows)))
        else:  # fewer rows than ranks: none here, but this rank joins the gathers
            out = tuple(torch.zeros((0, batch.response_mask.shape[1])) for _ in range(outputs))
        out = out if isinstance(out, tuple) else (out,)
        return [world.gather_rows(x, rows, batch.input_ids.shape[0]) for x in out]

    def _update(self, samples: list[Sample]) -> dict:
        s, model, world = self.s, self.model, self.world
        # Every rank builds the whole global batch (same padding as one process) and computes
        # the forward passes of its rows, `mine`; the gathered [B, T] results let every rank
        # compute rewards, advantages (whitened over the batch) and statistics exactly as one
        # process would.
        batch = make_batch([x.prompt_ids for x in samples], [x.completion_ids for x in samples],
                           model.pad_id)
        mask = batch.response_mask                              # [B, T]
        scores = torch.tensor([x.score for x in samples])       # [B]
        behaviour = torch.zeros_like(mask)
        for i, x in enumerate(samples):
            behaviour[i, : len(x.behaviour_logprobs)] = torch.tensor(x.behaviour_logprobs)
        n = len(samples)
        mine = world.shard(n)

        with torch.no_grad():
            old_logp, entropy = self._sharded(model.policy_logprobs, batch, mine, 2)  # [B, T]
            (ref_logp,) = self._sharded(model.reference_logprobs, batch, mine)        # [B, T]
            old_values = None
            if s.algo == "ppo":
                (old_values,) = self._sharded(model.values, batch, mine)              # [B, T]
        kl_tokens = pm.approx_kl(s.kl_estimator, old_logp, ref_logp) * mask
        kl_per_seq = kl_tokens.sum(-1)                          # [B]
        if s.algo == "ppo":
            rewards, _ = pm.kl_shaped_rewards(scores, old_logp, ref_logp, mask,
                                              self.kl_ctl.value, s.kl_estimator)
            advantages, returns = pm.gae(rewards, old_values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = pm.masked_whiten(advantages, mask)
        else:
            group = s.samples_per_prompt
            seq_adv = (pm.group_advantages(scores, group) if s.algo == "grpo"
                       else pm.rloo_advantages(scores, group))
            advantages = seq_adv[:, None].expand_as(mask) * mask
            returns = None

        reported = ("policy_loss", "value_loss", "clipfrac", "approx_kl")
        sums = dict.fromkeys(reported, 0.0)
        updates = 0
        params = model.trainable_parameters()
        for _ in range(s.ppo_epochs):
            # The same minibatches on every rank (rank 0's order); each rank computes the rows
            # of each minibatch that it owns.
            for idx in world.broadcast_(torch.randperm(n)).split(s.minibatch_size):
                own = world.own(idx)
                # The losses are means over the minibatch's tokens: a rank's part of that mean
                # is its mean times its share of the tokens, and the parts' gradients add up
                # (all_reduce_grads) to the gradient of the whole minibatch's loss.
                share = (mask[own].sum() / mask[idx].sum().clamp_min(1.0) if world.size > 1
                         else 1.0)
                part = dict.fromkeys(reported, 0.0)
                if len(own):
                    mb = batch.rows(own)
                    logp, _ = model.policy_logprobs(mb)
                    pg_loss, pg_stats = pm.ppo_policy_loss(logp, old_logp[own], advantages[own],
                                                           mb.response_mask, s.clip_range)
                    loss = pg_loss
                    if s.algo != "ppo" and self.kl_ctl.value > 0:
                        # GRPO/RLOO keep the reference close with a k3 penalty in the loss.
                        kl_term = pm.masked_mean(pm.kl_k3(logp, ref_logp[own]),
                                                 mb.response_mask)
                        loss = loss + self.kl_ctl.value * kl_term
                    (loss * share).backward()
                    vf_loss = torch.tensor(0.0)
                    if s.algo == "ppo":
                        values = model.values(mb)
                        vf_loss, vf_stats = pm.clipped_value_loss(
                            values, old_values[own], returns[own], mb.response_mask,
                            s.clip_range_value)
                        (s.vf_coef * vf_loss * share).backward()
                        pg_stats.update(vf_stats)
                    part.update({"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                                 "clipfrac": pg_stats["clipfrac"],
                                 "approx_kl": pg_stats["approx_kl"]})
                world.all_reduce_grads(params)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key in reported:
                    sums[key] += part[key] * float(share)
                updates += 1
        if world.size > 1:  # each rank holds its share of every minibatch's figures
            total = world.sum_(torch.tensor([sums[k] for k in reported], dtype=torch.float64))
            sums = dict(zip(reported, total.tolist(), strict=True))
        mean_kl = float(kl_per_seq.mean())
        self.kl_ctl.update(mean_kl, n)
        mismatch = pm.masked_mean((behaviour - old_logp).abs(), mask)
        avg = {k: v / updates for k, v in sums.items()}
        return {
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()) if n > 1 else 0.0,
            "kl": mean_kl,
            "entropy": float(pm.masked_mean(entropy, mask)),
            "policy_loss": avg["policy_loss"],
            "value_loss": avg["value_loss"],
            "clipfrac": avg["clipfrac"],
            "approx_kl": avg["approx_kl"],
            "logprob_mismatch": float(mismatch),
            "response_length": float(mask.sum(-1).mean()),
        }

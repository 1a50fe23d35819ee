"""The learner loop, one step at a time, reading like the algorithm:

    prompts -> Generate on the policy (n per prompt, logprobs) -> Score on the reward service
    -> reference logprobs (adapters off) -> critic values -> KL-shaped per-token rewards
    -> advantages (GAE, or group-relative for GRPO / leave-one-out for RLOO)
    -> PPO epochs over minibatches -> checkpoint -> push adapter v+1 to every policy replica

With max_staleness >= 1, generation for step k+1 starts before step k trains (on the adapter
version then served), so the two overlap; each rollout carries the version that produced it, and
rollouts more than max_staleness versions behind are thrown away and regenerated.
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

from services.trainer import checkpoint
from services.trainer import ppo_math as pm
from services.trainer.actor_critic import ActorCritic, make_batch
from services.trainer.clients import Sample, Services
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
    def __init__(self, settings: RunSettings, hooks: Hooks | None = None):
        settings.require_runnable()
        self.s = settings
        self.hooks = hooks or Hooks()
        self.out = Path(settings.out)
        self.prompts = read_prompts(settings.prompts)
        self.stop_requested = False
        self.step = 0
        self.version = 0  # adapter version the policy serves for this run (0 = none yet)
        self.cursor = DataCursor()
        self.services: Services | None = None
        self.model: ActorCritic | None = None

    # ------------------------------------------------------------------ set-up and resume

    def _build(self) -> None:
        s = self.s
        torch.manual_seed(s.seed)
        random.seed(s.seed)
        self.model = ActorCritic(s.resolved_model(), lora_rank=s.lora_rank,
                                 lora_alpha=s.lora_alpha, target_modules=s.target_modules,
                                 with_critic=s.algo == "ppo", init_adapter=s.init_adapter)
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=s.learning_rate)
        self.kl_ctl = (pm.AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon)
                       if s.target_kl else pm.FixedKLController(s.kl_coef))

    def _resume(self) -> Path | None:
        folder = checkpoint.latest(self.out)
        if folder is None:
            return None
        state = checkpoint.load(folder, model=self.model, optimizer=self.optimizer)
        self.step = state["step"]
        self.version = state["version"]
        self.cursor = DataCursor(**state["cursor"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self._rewrite_metrics(state.get("metrics"))
        log.info("resumed from %s at step %d (adapter v%d)", folder, self.step, self.version)
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
        self.out.mkdir(parents=True, exist_ok=True)
        self.services = Services(
            s.policy_addr, s.reward_addr, s.adapter_name, timeout=s.rpc_timeout_seconds,
            retry_max=s.retry_max_seconds,
            on_wait=lambda msg: self.hooks.on_state("waiting", msg),
            on_recover=lambda: self.hooks.on_state("running", ""),
        )
        await asyncio.to_thread(self._build)
        resumed = await asyncio.to_thread(self._resume)
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
        stats = await asyncio.to_thread(self._update, rollouts.samples)
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

    def _update(self, samples: list[Sample]) -> dict:
        s, model = self.s, self.model
        batch = make_batch([x.prompt_ids for x in samples], [x.completion_ids for x in samples],
                           model.pad_id)
        mask = batch.response_mask                              # [B, T]
        scores = torch.tensor([x.score for x in samples])       # [B]
        behaviour = torch.zeros_like(mask)
        for i, x in enumerate(samples):
            behaviour[i, : len(x.behaviour_logprobs)] = torch.tensor(x.behaviour_logprobs)

        with torch.no_grad():
            old_logp, entropy = model.policy_logprobs(batch)    # [B, T]
            ref_logp = model.reference_logprobs(batch)          # [B, T]
            old_values = model.values(batch) if s.algo == "ppo" else None
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

        sums: dict[str, float] = {}
        updates = 0
        params = model.trainable_parameters()
        n = len(samples)
        for _ in range(s.ppo_epochs):
            for idx in torch.randperm(n).split(s.minibatch_size):
                mb = batch.rows(idx)
                logp, _ = model.policy_logprobs(mb)
                pg_loss, pg_stats = pm.ppo_policy_loss(logp, old_logp[idx], advantages[idx],
                                                       mb.response_mask, s.clip_range)
                loss = pg_loss
                if s.algo != "ppo" and self.kl_ctl.value > 0:
                    # GRPO/RLOO keep the reference close with a k3 penalty in the loss.
                    kl_term = pm.masked_mean(pm.kl_k3(logp, ref_logp[idx]), mb.response_mask)
                    loss = loss + self.kl_ctl.value * kl_term
                loss.backward()
                vf_loss = torch.tensor(0.0)
                if s.algo == "ppo":
                    values = model.values(mb)
                    vf_loss, vf_stats = pm.clipped_value_loss(
                        values, old_values[idx], returns[idx], mb.response_mask,
                        s.clip_range_value)
                    (s.vf_coef * vf_loss).backward()
                    pg_stats.update(vf_stats)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key, value in {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(),
                                   **pg_stats}.items():
                    sums[key] = sums.get(key, 0.0) + value
                updates += 1
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

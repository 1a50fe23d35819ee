"""One step's update on a global batch of scored rollouts (PPO, GRPO or RLOO):

    recomputed logprobs, reference logprobs (adapters off), critic values
    -> KL-shaped per-token rewards -> advantages (GAE, or group-relative / leave-one-out)
    -> ppo_epochs passes over minibatches: clipped policy loss (+ k3 KL term for GRPO/RLOO),
       clipped value loss, one optimizer step per minibatch

Under torchrun every rank builds the whole global batch (the same padding as one process) and
computes the forward passes of its rows; the gathered [B, T] results let every rank compute the
rewards, advantages (whitened over the batch) and statistics exactly as one process would, and
each minibatch's backward pass is `World.backward`'s (services/trainer/distributed.py).
"""

from __future__ import annotations

import torch

from services.trainer import rl_math as rl
from services.trainer.clients import Sample
from services.trainer.distributed import World
from services.trainer.ppo.actor_critic import ActorCritic, Batch, make_batch
from services.trainer.ppo.settings import PPOSettings

# Figures averaged over the step's minibatch updates.
UPDATE_FIGURES = ("loss/policy", "loss/value", "policy/clipfrac", "kl/approx")


class Update:
    def __init__(self, settings: PPOSettings, model: ActorCritic, optimizer, kl_ctl,
                 world: World):
        self.s, self.model, self.optimizer, self.kl_ctl, self.world = (settings, model, optimizer,
                                                                        kl_ctl, world)

    def __call__(self, samples: list[Sample]) -> dict:
        """Trains on `samples` (the same on every rank); returns the step's figures."""
        s, model, world = self.s, self.model, self.world
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
        kl_per_seq = (rl.approx_kl(s.kl_estimator, old_logp, ref_logp) * mask).sum(-1)  # [B]
        if s.algo == "ppo":
            rewards, _ = rl.kl_shaped_rewards(scores, old_logp, ref_logp, mask,
                                              self.kl_ctl.value, s.kl_estimator)
            advantages, returns = rl.gae(rewards, old_values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = rl.masked_whiten(advantages, mask)
        else:
            group = s.samples_per_prompt
            seq_adv = (rl.group_advantages(scores, group) if s.algo == "grpo"
                       else rl.rloo_advantages(scores, group))
            advantages = seq_adv[:, None].expand_as(mask) * mask
            returns = None

        sums = dict.fromkeys(UPDATE_FIGURES, 0.0)
        updates = 0
        params = model.trainable_parameters()
        for _ in range(s.ppo_epochs):
            # The same minibatches on every rank (rank 0's order).
            for idx in world.broadcast_(torch.randperm(n)).split(s.minibatch_size):
                # The losses are means over the minibatch's response tokens.
                _, part = world.backward(
                    params, len(idx), lambda pos, idx=idx: float(mask[idx[pos]].sum()),
                    lambda pos, scale, idx=idx: self._minibatch(
                        batch.rows(idx[pos]), idx[pos], scale, old_logp, ref_logp, old_values,
                        advantages, returns),
                    UPDATE_FIGURES)
                torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key in UPDATE_FIGURES:
                    sums[key] += part[key]
                updates += 1
        mean_kl = float(kl_per_seq.mean())
        self.kl_ctl.update(mean_kl, n)
        return {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if n > 1 else 0.0,
            "kl/ref": mean_kl,
            "policy/entropy": float(rl.masked_mean(entropy, mask)),
            **{key: value / updates for key, value in sums.items()},
            "policy/logprob_mismatch": float(rl.masked_mean((behaviour - old_logp).abs(), mask)),
            "policy/response_length": float(mask.sum(-1).mean()),
        }

    def _minibatch(self, mb: Batch, rows: torch.Tensor, scale: float, old_logp, ref_logp,
                   old_values, advantages, returns) -> dict[str, float]:
        """Backward passes of the loss of `rows` (global row indices) times `scale`; their
        figures. The policy's graph is freed before the critic's forward pass."""
        s, model = self.s, self.model
        logp, _ = model.policy_logprobs(mb)
        pg_loss, pg_stats = rl.ppo_policy_loss(logp, old_logp[rows], advantages[rows],
                                               mb.response_mask, s.clip_range)
        loss = pg_loss
        if s.algo != "ppo" and self.kl_ctl.value > 0:
            # GRPO/RLOO keep the reference close with a k3 penalty in the loss.
            loss = loss + self.kl_ctl.value * rl.masked_mean(rl.kl_k3(logp, ref_logp[rows]),
                                                             mb.response_mask)
        (loss * scale).backward()
        vf_loss = torch.tensor(0.0)
        if s.algo == "ppo":
            vf_loss, _ = rl.clipped_value_loss(model.values(mb), old_values[rows], returns[rows],
                                               mb.response_mask, s.clip_range_value)
            (s.vf_coef * vf_loss * scale).backward()
        return {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                "policy/clipfrac": pg_stats["clipfrac"], "kl/approx": pg_stats["approx_kl"]}

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

"""One step's update on a global batch of scored rollouts (PPO, GRPO or RLOO):

    old logprobs, reference logprobs (adapters off), critic values: no-grad passes
    -> KL-shaped per-token rewards -> advantages (GAE, or group-relative / leave-one-out)
    -> ppo_epochs passes over minibatches: the policy loss of `loss_type` (losses.py; + the KL
       term of `kl_estimator` for GRPO/RLOO), each token's term weighted by the mismatch
       correction (pi_learner_old / pi_vllm: TIS or MIS), clipped value loss, one optimizer step
       per minibatch
    -> the gates (ppo/gates.py): a step whose losses, gradients before clipping or weights are
       not finite, or whose update is larger than max_update_norm, is rolled back (weights and
       optimizer state) and reported with `gate/failed` and `gate/reason`

No pass is done that the step does not need:
- the rows of the first minibatch of the first epoch take their old logprobs (and entropy) from
  their own training forward, detached (the weights have not moved yet, so they are the same
  numbers; TRL's GRPO does this with one optimizer step per batch). PPO with a KL penalty is the
  exception: its per-token rewards need every row's old logprobs before the first loss.
- the reference pass runs only when a KL coefficient is in effect (> 0, or adaptive);
- the per-token KL is computed once (`kl_shaped_rewards` returns it for the figures).
`passes/<kind>` in the figures counts each kind of pass in whole-batch units (1.0 = every row
once); docs/trainer.md lists them per algorithm.

A rank's rows go through the model `micro_batch_size` at a time (gradient accumulation: each
micro batch's loss is weighted by its share of the rank's denominator, `losses.row_weights`:
tokens for the token means, rows for the sequence means), so peak memory follows the micro
batch. With a sharded base (FSDP2) every forward pass is a collective: all ranks then run
the same number of passes, a rank short of rows running a pass of weight 0 (`lockstep`).

Under torchrun every rank builds the whole global batch (the same padding as one process) and
computes the forward passes of its rows; the gathered [B, T] results let every rank compute the
rewards, advantages (whitened over the batch) and statistics exactly as one process would, and
each minibatch's backward pass is `World.backward`'s (services/trainer/distributed.py).
"""

from __future__ import annotations

import resource

import torch

from services.trainer import losses
from services.trainer import rl_math as rl
from services.trainer.clients import Sample
from services.trainer.distributed import World
from services.trainer.ppo import gates
from services.trainer.ppo.actor_critic import ActorCritic, Batch, make_batch
from services.trainer.ppo.settings import PPOSettings

# Figures averaged over the step's minibatch updates.
UPDATE_FIGURES = ("loss/policy", "loss/value", "policy/clipfrac", "kl/approx")
# Kinds of passes counted per step (`passes/<kind>` figures).
PASS_KINDS = ("forward_policy", "forward_ref", "forward_value", "backward_policy",
              "backward_value")


class Update:
    """`reuse_forwards=False` runs the plain sequence of passes instead (a no-grad pass for every
    row's old logprobs, and the reference pass whatever the KL coefficient): the same update,
    which the tests compare against."""

    def __init__(self, settings: PPOSettings, model: ActorCritic, optimizer, kl_ctl,
                 world: World, *, reuse_forwards: bool = True):
        self.s, self.model, self.optimizer, self.kl_ctl, self.world = (settings, model, optimizer,
                                                                        kl_ctl, world)
        self.reuse_forwards = reuse_forwards
        self.device = getattr(model, "device", torch.device("cpu"))
        self.lockstep = bool(getattr(model, "sharded", False)) and world.size > 1
        self.passes = dict.fromkeys(PASS_KINDS, 0.0)

    def __call__(self, samples: list[Sample]) -> dict:
        """Trains on `samples` (the same on every rank); returns the step's figures."""
        s, model, world, dev = self.s, self.model, self.world, self.device
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        self.passes = dict.fromkeys(PASS_KINDS, 0.0)
        batch = make_batch([x.prompt_ids for x in samples], [x.completion_ids for x in samples],
                           model.pad_id).to(dev)
        mask = batch.response_mask                                        # [B, T]
        scores = torch.tensor([x.score for x in samples]).to(dev)         # [B]
        behaviour = torch.zeros(mask.shape)
        known = torch.zeros(mask.shape)  # 1 where vLLM returned the token's logprob
        for i, x in enumerate(samples):
            behaviour[i, : len(x.behaviour_logprobs)] = torch.tensor(x.behaviour_logprobs)
            known[i, : len(x.behaviour_logprobs)] = 1.0
        behaviour = behaviour.to(dev)
        known = known.to(dev) * mask                                      # [B, T]
        n = len(samples)
        # Every epoch's minibatches, drawn first (rank 0's order on every rank; the passes
        # draw no random numbers, so the order is the one drawn epoch by epoch).
        minibatches = [self._order(n).split(s.minibatch_size) for _ in range(s.ppo_epochs)]

        penalty = self.kl_ctl.value > 0
        need_ref = penalty or self.kl_ctl.kind == "adaptive" or not self.reuse_forwards
        defer = self.reuse_forwards and not (s.algo == "ppo" and penalty)
        deferred = set(minibatches[0][0].tolist()) if defer else set()
        with torch.no_grad():
            old_logp, entropy = self._sharded(
                "forward_policy", model.policy_logprobs, batch,
                [r for r in range(n) if r not in deferred], outputs=2)        # [B, T]
            ref_logp = None
            if need_ref:
                (ref_logp,) = self._sharded("forward_ref", model.reference_logprobs, batch,
                                            range(n))                         # [B, T]
            old_values = None
            if s.algo == "ppo":
                (old_values,) = self._sharded("forward_value", model.values, batch,
                                              range(n))                       # [B, T]
        kl = None
        if s.algo == "ppo":
            if penalty:
                rewards, kl = rl.kl_shaped_rewards(scores, old_logp, ref_logp, mask,
                                                   self.kl_ctl.value, s.kl_estimator)
            else:
                rewards = rl.last_token_rewards(scores, mask)
            advantages, returns = rl.gae(rewards, old_values, mask, s.gamma, s.lam)
            if s.whiten_advantages:
                advantages = rl.masked_whiten(advantages, mask)
        else:
            group = s.samples_per_prompt
            # Dr. GRPO drops the group std (its bias toward groups of similar scores).
            seq_adv = (rl.group_advantages(scores, group,
                                           normalize_std=s.loss_type != "dr_grpo")
                       if s.algo == "grpo" else rl.rloo_advantages(scores, group))
            advantages = seq_adv[:, None].expand_as(mask) * mask
            returns = None

        # Rows kept out of the loss (ppo/sampling.py's overlong filter): their scores count in
        # the advantages above, their tokens in nothing below.
        if out := [i for i, x in enumerate(samples) if not x.in_loss]:
            mask[out] = 0
        sums = dict.fromkeys(UPDATE_FIGURES, 0.0)
        updates = 0
        params = model.trainable_parameters()
        # What the gates compare against, and what a step that fails them returns to.
        before = gates.Snapshot(params, self.optimizer)
        policy = model.adapter_parameters("policy")
        policy_before = [before.weights[i] for i, p in enumerate(params)
                         if any(p is q for q in policy)]
        grad_norms = []
        tokens = losses.row_weights(s.loss_type, mask).tolist()  # [B] loss denominator per row
        for epoch, epoch_minibatches in enumerate(minibatches):
            for k, idx in enumerate(epoch_minibatches):
                rows = idx.tolist()
                # The first minibatch's training forward gives the deferred rows' old
                # logprobs; each rank writes its rows, the sum over ranks is exact.
                fill = (torch.zeros((len(rows), 2, mask.shape[1]), device=dev)
                        if deferred and epoch == 0 and k == 0 else None)
                total, part = world.backward(
                    params, len(rows), lambda pos, rows=rows: sum(tokens[rows[p]] for p in pos),
                    lambda pos, scale, rows=rows, fill=fill: self._minibatch(
                        batch, rows, pos, scale, fill, tokens, old_logp, ref_logp, old_values,
                        advantages, returns, behaviour, known),
                    UPDATE_FIGURES, lockstep=self.lockstep)
                if fill is not None:
                    world.sum_(fill)
                    at = torch.tensor(rows, device=dev)
                    old_logp[at], entropy[at] = fill[:, 0], fill[:, 1]
                if total > 0:
                    share = len(rows) / n
                    for kind in ("forward_policy", "backward_policy") + (
                            ("forward_value", "backward_value") if s.algo == "ppo" else ()):
                        self.passes[kind] += share
                grad_norms.append(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key in UPDATE_FIGURES:
                    sums[key] += part[key]
                updates += 1

        figures = {key: value / updates for key, value in sums.items()}
        verdict = gates.judge(figures, [float(g) for g in grad_norms],
                              [(name, p) for name, p in model.named_parameters()
                               if p.requires_grad], policy_before, policy, s.max_update_norm)
        if not verdict.passed:
            before.restore(self.optimizer)
        stats = {
            "reward/mean": float(scores.double().mean()),
            "reward/std": float(scores.double().std()) if n > 1 else 0.0,
            "gate/failed": 0.0 if verdict.passed else 1.0,
            "gate/update_norm": verdict.update_norm,
            "gate/grad_norm": verdict.grad_norm,
            **({} if verdict.passed else {"gate/reason": verdict.reason}),
        }
        if ref_logp is not None:
            if kl is None:
                kl = rl.approx_kl(s.kl_estimator, old_logp, ref_logp) * mask   # [B, T]
            mean_kl = float(kl.sum(-1).mean())
            if verdict.passed:  # a rolled-back step leaves the controller where it was
                self.kl_ctl.update(mean_kl, n)
            stats["kl/ref"] = mean_kl
        weights = losses.mismatch_weights(s.mismatch_correction, old_logp, behaviour, known,
                                          s.mismatch_threshold)
        stats.update(losses.mismatch_stats(old_logp, behaviour, known, weights))
        return {
            **stats,
            "policy/entropy": float(rl.masked_mean(entropy, mask)),
            **figures,
            "policy/logprob_mismatch": float(rl.masked_mean((behaviour - old_logp).abs(), mask)),
            "policy/response_length": float(mask.sum(-1).mean()),
            "memory/peak_gb": self._peak_gb(),
            **{f"passes/{kind}": value for kind, value in self.passes.items()},
        }

    def _order(self, n: int) -> torch.Tensor:
        """A permutation of the n rows, rank 0's on every rank (drawn on the CPU, so every
        device trains on the same minibatches)."""
        return self.world.broadcast_(torch.randperm(n).to(self.device)).cpu()

    def _chunks(self, rows: list[int], m: int) -> list[list[int]]:
        """This rank's `rows` (its share of m rows) in micro batches; in lockstep padded with
        empty ones to the number every rank runs."""
        most = -(-m // self.world.size)  # the largest share of a rank
        size = self.s.micro_batch_size or max(most, 1)
        chunks = [rows[i: i + size] for i in range(0, len(rows), size)]
        if self.lockstep:
            chunks += [[] for _ in range(-(-most // size) - len(chunks))]
        return chunks

    def _minibatch(self, batch: Batch, rows: list[int], pos: list[int], scale: float,
                   fill: torch.Tensor | None, tokens: list[float], old_logp, ref_logp,
                   old_values, advantages, returns, behaviour, known) -> dict[str, float]:
        """Backward passes of the loss of this rank's rows of a minibatch (`rows[p]` for p in
        `pos`) times `scale`, one micro batch at a time; their figures. In each micro batch
        the policy's graph is freed before the critic's forward pass."""
        s, model = self.s, self.model
        mine = [rows[p] for p in pos]
        where = dict(zip(mine, pos, strict=True))
        weight = sum(tokens[r] for r in mine)
        figures = dict.fromkeys(UPDATE_FIGURES, 0.0)
        for chunk in self._chunks(mine, len(rows)):
            part = sum(tokens[r] for r in chunk) / weight if weight else 0.0
            if not chunk:  # lockstep: this rank has no rows left
                self._idle_pass(batch)
                continue
            if part == 0 and not self.lockstep:  # no response tokens: nothing to learn
                continue
            at = torch.tensor(chunk, device=self.device)
            mb = batch.rows(at)
            logp, entropy = model.policy_logprobs(mb, entropy=fill is not None)
            if fill is not None:
                old = logp.detach()
                slots = torch.tensor([where[r] for r in chunk], device=self.device)
                fill[slots, 0], fill[slots, 1] = old, entropy
            else:
                old = old_logp[at]
            correction = losses.mismatch_weights(s.mismatch_correction, old, behaviour[at],
                                                 known[at], s.mismatch_threshold)
            pg_loss, pg_stats = losses.policy_loss(
                s.loss_type, logp, old, advantages[at], mb.response_mask, *s.clip_bounds(),
                correction, max_new_tokens=s.max_new_tokens)
            loss = pg_loss
            if s.algo != "ppo" and self.kl_ctl.value > 0:
                # GRPO/RLOO keep the reference close with a KL term in the loss.
                loss = loss + self.kl_ctl.value * losses.aggregate(
                    s.loss_type, rl.approx_kl(s.kl_estimator, logp, ref_logp[at]),
                    mb.response_mask, s.max_new_tokens)
            (loss * (scale * part)).backward()
            vf_loss = 0.0
            if s.algo == "ppo":
                value_loss, _ = rl.clipped_value_loss(model.values(mb), old_values[at],
                                                      returns[at], mb.response_mask,
                                                      s.clip_range_value)
                (s.vf_coef * value_loss * (scale * part)).backward()
                vf_loss = value_loss.item()
            for key, value in (("loss/policy", pg_loss.item()), ("loss/value", vf_loss),
                               ("policy/clipfrac", pg_stats["clipfrac"]),
                               ("kl/approx", pg_stats["approx_kl"])):
                figures[key] += part * value
        return figures

    def _idle_pass(self, batch: Batch) -> None:
        """A training pass of weight 0 on one row: with a sharded base, a rank with no rows
        left still joins the collectives of the others' passes."""
        mb = batch.rows(torch.tensor([0], device=self.device))
        logp, _ = self.model.policy_logprobs(mb, entropy=False)
        (logp.sum() * 0.0).backward()
        if self.s.algo == "ppo":
            (self.model.values(mb).sum() * 0.0).backward()

    def _sharded(self, kind: str, fn, batch: Batch, rows, outputs: int = 1
                 ) -> list[torch.Tensor]:
        """fn on the global `rows` of the batch -> `outputs` tensors [B, T] (zeros on the rows
        not asked for): each rank computes its share of `rows`, a micro batch at a time, and
        every rank gets the whole result."""
        world, n = self.world, batch.input_ids.shape[0]
        rows = list(rows)
        mine = [rows[i] for i in world.shard(len(rows))]
        parts: list[list[torch.Tensor]] = [[] for _ in range(outputs)]
        for chunk in self._chunks(mine, len(rows)):
            at = torch.tensor(chunk or [0], device=self.device)
            out = fn(batch.rows(at))
            if not chunk:  # lockstep: a pass that only joins the others' collectives
                continue
            out = out if isinstance(out, tuple) else (out,)
            for i in range(outputs):
                parts[i].append(out[i])
        self.passes[kind] += len(rows) / n
        width = batch.response_mask.shape[1]
        local = [torch.cat(p) if p else torch.zeros((0, width), device=self.device)
                 for p in parts]
        return [world.gather_rows(x, mine, n) for x in local]

    def _peak_gb(self) -> float:
        """Peak memory of this step: CUDA's max allocated on the device; on the CPU the
        process's peak resident set (ru_maxrss, KiB on Linux), which never goes down."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

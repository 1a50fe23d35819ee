"""Data parallelism for the trainer's stages under `torchrun` (one process per GPU, or per core
group on CPU with gloo): who does what, and the few collectives the stages use.

    torchrun --nproc-per-node 2 -m rlhf.cli train ppo --config run.yaml
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
        -m rlhf.cli train ppo --config run.yaml      (the same command on every node)

On CUDA each rank computes on cuda:$LOCAL_RANK and the ranks talk over NCCL; on CPU over gloo
(`resolve_device`, `backend_for`).

Every rank holds the same model and optimizer and sees the same global batch. `World.backward` is
the one data-parallel backward pass of every stage: each rank computes the forward/backward of
its share of a batch's rows, weighting its loss by its share of the batch's loss denominator
(tokens or items), so that the SUM of the ranks' gradients is the one-process gradient of the
whole batch; the gradients are then summed with one all-reduce over a flat buffer of the
trainable parameters, every rank clips and steps the same way and the weights stay equal, as
under DistributedDataParallel.

Why not wrap the model in DDP: the learner runs two peft adapters on one base (policy, critic),
several forward passes per optimizer step (policy logprobs, then values), and a rank may own no
row of a minibatch (it then runs no forward at all). DDP's reducer expects one forward and one
backward per step from every rank and a fixed set of used parameters. The trainable weights are
only the LoRA matrices and small heads, so one explicit all-reduce is as cheap and exact.

Without torchrun (no WORLD_SIZE in the environment) `world()` is a single process and every
helper computes on the whole batch and returns its input unchanged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from rlhf.plumbing.config import ConfigError

DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that talks to services, writes files and shows progress."""
        return self.rank == 0

    # ------------------------------------------------------------------ who owns which rows

    def shard(self, n: int) -> list[int]:
        """The rows of an n-row global batch this rank computes: rank, rank + size, ... (sizes
        differ by at most one; a rank may get none when n < size)."""
        return list(range(self.rank, n, self.size))

    # ------------------------------------------------------------------ collectives

    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled; for rollouts and small control messages)."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's values into `tensor` on every rank (in place; returns it)."""
        if self.size > 1:
            dist.broadcast(tensor, src=0)
        return tensor

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` over the ranks, in place on every rank (returns it)."""
        if self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def gather_rows(self, local: torch.Tensor, rows: Sequence[int], n: int) -> torch.Tensor:
        """[n, ...]: every rank's `local` rows ([len(rows), ...], for the global `rows` it owns)
        put together on every rank. Each row is written by exactly one rank and the rest add
        zeros, so the result is exact."""
        if self.size == 1 and len(rows) == n:
            return local
        full = torch.zeros((n, *local.shape[1:]), dtype=local.dtype, device=local.device)
        if len(rows):
            full[torch.as_tensor(rows, dtype=torch.long, device=local.device)] = local
        return self.sum_(full)

    def all_reduce_grads(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks, in one all-reduce. A parameter that got
        no gradient on this rank (it owned no row) counts as zeros; one that got none on any
        rank keeps None, as in one process (the optimizer then skips it, weight decay too)."""
        if self.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        had = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype,
                           device=grads[0].device)
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads] + [had]))
        offset = 0
        for i, p in enumerate(params):
            n = p.numel()
            had_any = bool(flat[flat.numel() - len(params) + i] > 0)
            p.grad = flat[offset: offset + n].view_as(p).clone() if had_any else None
            offset += n

    def backward(self, params: Sequence[torch.nn.Parameter], n: int,
                 weight: Callable[[list[int]], float],
                 step: Callable[[list[int], float], dict[str, float]],
                 figures: Sequence[str] = (), lockstep: bool = False
                 ) -> tuple[float, dict[str, float]]:
        """One data-parallel backward pass over an n-row global batch.

        `weight(rows)` is the rows' part of the loss denominator (their target tokens, or their
        number); `step(rows, scale)` runs the forward and backward passes of `rows` (this rank's
        share, `shard(n)`) with its mean loss multiplied by `scale` = its share of the batch's
        weight, and returns the `figures` named, as means over those rows. The gradients are then
        summed over the ranks. Returns (the batch's weight, each figure: every rank's value times
        its share, summed over the ranks), the same on every rank: the gradients and figures of
        one process on the whole batch. A batch of weight 0 computes nothing.

        `lockstep`: `step` runs on every rank, also one with no rows or no weight (it is then
        given scale 0), for a model whose forward pass is itself a collective (a sharded base)."""
        total = float(weight(list(range(n))))
        if total == 0:
            return 0.0, dict.fromkeys(figures, 0.0)
        mine = self.shard(n)
        share = float(weight(mine)) / total if mine else 0.0
        local = (step(mine, share) if share > 0 or lockstep
                 else dict.fromkeys(figures, 0.0))
        if self.size == 1:
            return total, {k: local[k] for k in figures}
        self.all_reduce_grads(params)
        parts = torch.tensor([local[k] * share for k in figures], dtype=torch.float64,
                             device=params[0].device if params else None)
        return total, dict(zip(figures, self.sum_(parts).tolist(), strict=True))

    def broadcast_params(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Rank 0's values of `params` on every rank (DDP does this when it wraps a model): the
        replicas start equal even if something in their set-up was not deterministic."""
        if self.size == 1:
            return
        with torch.no_grad():
            flat = self.broadcast_(torch.cat([p.detach().reshape(-1) for p in params]))
            offset = 0
            for p in params:
                p.copy_(flat[offset: offset + p.numel()].view_as(p))
                offset += p.numel()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def world() -> World:
    """The current process group's world (a single process when none is initialized)."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return World()


def check_device(spec: str) -> str:
    """`spec` (auto, cpu, cuda or cuda:N) if this machine has that device; a ValueError saying
    why not otherwise (settings validation turns it into a ConfigError naming `device`)."""
    spec = spec.strip().lower()
    if not DEVICE_SPEC.match(spec):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, not {spec!r}")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"{spec!r} needs a CUDA GPU and this machine has none "
                             "(torch.cuda.is_available() is false); use cpu or auto")
        count = torch.cuda.device_count()
        if ":" in spec and int(spec.split(":")[1]) >= count:
            raise ValueError(f"{spec!r} does not exist: this machine has {count} CUDA "
                             f"device(s), cuda:0 to cuda:{count - 1}")
    return spec


def resolve_device(spec: str, world_: World | None = None) -> torch.device:
    """The device this rank computes on: `auto` is CUDA when available, else the CPU; `cuda` is
    cuda:LOCAL_RANK (cuda:0 without torchrun). ConfigError naming `device` when the machine has
    no such device, or when `cuda:N` pins every rank of a multi-rank run to one GPU."""
    world_ = world_ or world()
    try:
        spec = check_device(spec)
    except ValueError as exc:
        raise ConfigError(f"device: {exc}") from None
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda":
        index = world_.local_rank
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device: rank {world_.rank} has LOCAL_RANK {index} but this node "
                              f"has {torch.cuda.device_count()} CUDA device(s); run at most that "
                              "many ranks per node (torchrun --nproc-per-node)")
        return torch.device("cuda", index)
    if world_.size > 1:
        raise ConfigError(f"device: {spec!r} would put all {world_.size} ranks on one GPU; under "
                          "torchrun use cuda or auto (each rank takes cuda:LOCAL_RANK)")
    return torch.device(spec)


def backend_for(spec: str) -> str:
    """The collectives' backend for a run on device `spec`: NCCL for CUDA, gloo for the CPU."""
    try:
        spec = check_device(spec)
    except ValueError as exc:
        raise ConfigError(f"device: {exc}") from None
    cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def process_group(backend: str = "gloo", timeout: timedelta = timedelta(minutes=30)
                  ) -> Iterator[World]:
    """Joins the process group torchrun set up (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment) for the duration of a stage, and leaves it after; a plain single process when
    not launched by torchrun.

    `timeout` bounds every collective: a rank that waits longer (for instance for rank 0 while
    it waits on an unavailable service) fails rather than hangs.
    """
    if not launched_by_torchrun() or dist.is_initialized():
        yield world()
        return
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timeout)
    try:
        yield world()
    finally:
        dist.destroy_process_group()

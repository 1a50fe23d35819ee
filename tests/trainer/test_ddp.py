"""Data-parallel training: 2 gloo ranks on CPU against 1 process (device: cpu, also on a machine
with CUDA; tests/trainer/test_devices.py covers the devices).

- The learner's update: a PPO / GRPO step on a fixed global batch of rollouts (no services
  needed), run by one process and by 2 ranks that each compute half of the rows, gives the same
  adapter, critic and statistics within the tolerance below; both ranks end with equal weights.
- `torchrun --nproc-per-node 2 -m rlhf.cli train ppo` against a vLLM policy and a rule reward on
  127.0.0.1: rank 0 alone writes the run and pushes, and the adapter after step 1 equals the one a
  single-process run makes from the same first rollouts.
- `train sft` and `train rm` under torchrun write the same adapter as one process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.ports import free_port

# The stated tolerance. In fp32 the ranks add the same terms in another order, so the weights
# differ by rounding only: ~1e-9 on average (measured 1e-9 for PPO, 2e-9 for GRPO, after 4
# optimizer steps that move the weights by 1.5e-3 on average at lr = 1e-3). Adam divides each
# gradient by its own running scale (eps = 1e-8), which turns the rounding of a gradient near
# zero into up to ~1e-5 on a rare weight (measured 6e-6 and 1e-5). A mistake in the sharding or
# in the loss weights moves weights at the scale of a step, ~1e-3.
MAX_ABS = 1e-4   # every weight: within a tenth of one optimizer step
MEAN_ABS = 1e-7  # averaged over all trained weights: 1e-4 of the step's mean move
STATS_REL = 1e-4  # reported statistics (losses, clipfrac, approx_kl, ...)


def _settings(model_dir: Path, root: Path, algo: str, samples_per_prompt: int):
    from services.trainer.ppo.settings import PPOSettings

    prompts = root / "prompts.jsonl"
    prompts.write_text('{"prompt": "unused here"}\n')
    return PPOSettings.load(
        None, model=model_dir, prompts=prompts, out=root / "run", algo=algo,
        policy_addr=["127.0.0.1:1"], reward_addr=["127.0.0.1:1"],  # never called by _update
        samples_per_prompt=samples_per_prompt, ppo_epochs=2, minibatch_size=4,
        learning_rate=1e-3, kl_coef=0.1, lora_rank=4, seed=7, device="cpu",
    )


def _rollouts(n_prompts: int, per_prompt: int, seed: int = 0):
    """A fixed global batch: prompts of 2-7 tokens, completions of 1-8."""
    from services.trainer.clients import Sample

    rng = random.Random(seed)
    samples = []
    for p in range(n_prompts):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(2, 7))]
        for _ in range(per_prompt):
            length = rng.randint(1, 8)
            samples.append(Sample(
                prompt_index=p, prompt_ids=prompt,
                completion_ids=[rng.randrange(3, 500) for _ in range(length)],
                completion_text="", behaviour_logprobs=[-rng.uniform(4, 8) for _ in range(length)],
                adapter_version=1, score=rng.uniform(-1, 1)))
    return samples


def _trained(learner) -> dict[str, torch.Tensor]:
    """The weights the learner trains (policy LoRA; for PPO also critic LoRA and value head)."""
    ids = {id(p) for p in learner.model.trainable_parameters()}
    return {n: p.detach().cpu().clone() for n, p in learner.model.named_parameters()
            if id(p) in ids}


def _rank(rank: int, size: int, port: int, settings, samples, out: Path) -> None:
    """One rank of the data-parallel step (spawned); rank 0 first does the one-process step."""
    import torch.distributed as dist

    from services.trainer.distributed import World, world
    from services.trainer.ppo.learner import Learner

    torch.set_num_threads(1)
    backend = "gloo"
    if settings.device == "cuda":  # as torchrun would: rank r on cuda:r, NCCL
        torch.cuda.set_device(rank)
        backend = "nccl"
    if rank == 0:
        single = Learner(settings, world_=World())
        single._build()
        single._resume()
        before = _trained(single)
        stats = single.update(samples)
        torch.save({"before": before, "after": _trained(single), "stats": stats},
                   out / "single.pt")
        del single
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    try:
        learner = Learner(settings, world_=world())
        learner._build()
        learner._resume()
        if rank == 0:  # as in a run: rank 0 sends the batch, trains, then ends the run
            stats = learner._update_all(samples)
            learner.world.broadcast_object(None)
        else:
            learner._follow()
            stats = None
        torch.save({"after": _trained(learner), "stats": stats, "steps": learner.step},
                   out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="NCCL across 2 ranks needs 2 CUDA devices"))])
@pytest.mark.parametrize(("algo", "n_prompts", "per_prompt"),
                         [("ppo", 5, 1), ("grpo", 3, 2)])
def test_two_ranks_make_the_same_update_as_one_process(tiny_model_dir, tmp_path, algo,
                                                       n_prompts, per_prompt, device):
    import torch.multiprocessing as mp

    # On CUDA in float32: the tolerance is about summation order, not bfloat16 rounding.
    settings = _settings(tiny_model_dir, tmp_path, algo, per_prompt).model_copy(
        update={"device": device, "compute_dtype": "float32"})
    samples = _rollouts(n_prompts, per_prompt)  # 5 or 6 rows: uneven or even shards
    mp.start_processes(_rank, args=(2, free_port(), settings, samples, tmp_path), nprocs=2,
                       join=True, start_method="spawn")

    single = torch.load(tmp_path / "single.pt")
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    names = sorted(single["after"])
    assert any(".critic." in n for n in names) == (algo == "ppo")
    assert sorted(rank0["after"]) == names

    def flat(d):
        return torch.cat([d[n].reshape(-1) for n in names])

    moved = (flat(single["after"]) - flat(single["before"])).abs()
    assert moved.mean() > 5e-4  # the step changed the weights: the comparison means something
    diff = (flat(rank0["after"]) - flat(single["after"])).abs()
    print(f"{algo}: {diff.numel()} weights, |2 ranks - 1 process| max {diff.max():.2e} mean "
          f"{diff.mean():.2e}; the step moved them by {moved.mean():.2e} on average")
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (diff.max(), diff.mean())
    # The ranks apply the same summed gradients: their weights stay equal bit for bit.
    assert torch.equal(flat(rank0["after"]), flat(rank1["after"]))
    assert rank1["steps"] == 1
    assert rank0["stats"].keys() == single["stats"].keys()
    for key, value in single["stats"].items():
        assert rank0["stats"][key] == pytest.approx(value, rel=STATS_REL, abs=1e-7), key


# ------------------------------------------------------------------ the command under torchrun

PROMPTS = ["the cat", "a dog", "hello", "once upon", "red apple", "big sky", "my friend",
           "the end"]


async def _run(args: list[str], env: dict) -> str:
    import asyncio

    proc = await asyncio.create_subprocess_exec(*args, env=env, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 300)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.vllm
@pytest.mark.slow
async def test_torchrun_two_ranks_run_the_command_and_match_one_process(policy_lora, tmp_path):
    import grpc

    from rlhf.plumbing.server import GrpcServer
    from rlhf.v1 import policy_pb2, policy_pb2_grpc
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig
    from tests.fixtures.policy_helpers import ADMIN

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = RewardConfig.load(grpc_port=0, metrics_port=0, drain_grace_seconds=1,
                            scorer=["rule:length?target=40&unit=chars"])
    reward = await GrpcServer(cfg, RewardApp(cfg)).start()
    env = {**os.environ, "RLHF_POLICY_ADMIN_TOKEN": ADMIN, "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}

    def config(name: str, steps: int) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps({  # JSON is YAML
            "model": str(policy_lora.model_dir), "prompts": str(prompts),
            "out": str(tmp_path / name), "policy_addr": [policy_lora.addr],
            "reward_addr": [f"127.0.0.1:{reward.port}"], "adapter_name": f"ddp-{name}",
            "steps": steps, "prompts_per_step": 4, "samples_per_prompt": 2,
            "max_new_tokens": 8, "learning_rate": 1e-3, "seed": 5, "device": "cpu"}))
        return path

    try:
        two = await _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                          "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                          "--master-port", str(free_port()), "-m", "rlhf.cli", "train", "ppo",
                          "--config", str(config("two", steps=2))], env)
        await _run([sys.executable, "-m", "rlhf.cli", "train", "ppo",
                    "--config", str(config("one", steps=1))], env)
    finally:
        await reward.shutdown()

    # Rank 0 alone wrote the run: one line per step, one printed result.
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert [r["adapter/version"] for r in rows] == [2, 3]  # v1 = the initial adapter
    assert two.count(str(tmp_path / "two" / "metrics.jsonl")) == 1
    async with grpc.aio.insecure_channel(policy_lora.addr) as ch:
        listed = await policy_pb2_grpc.PolicyServiceStub(ch).ListAdapters(
            policy_pb2.ListAdaptersRequest(name="ddp-two"))
    assert sorted(a.adapter.version for a in listed.adapters) == [1, 2, 3]

    # Step 1 of both runs trained on the same rollouts (the initial adapter, the same seed):
    # the adapter the 2 ranks made equals the one-process adapter.
    one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[0])
    assert one["reward/mean"] == rows[0]["reward/mean"]
    ddp = _adapter(tmp_path / "two" / "checkpoints" / "step-1" / "policy")
    single = _adapter(tmp_path / "one" / "checkpoints" / "step-1" / "policy")
    assert ddp.keys() == single.keys()
    diff = torch.cat([(ddp[k] - single[k]).abs().reshape(-1) for k in sorted(ddp)])
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (diff.max(), diff.mean())


# ------------------------------------------------------------------ the SFT and reward-model stages


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
            "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *args]


def _command(args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def _same_adapter(ddp: Path, single: Path) -> None:
    a, b = _adapter(ddp), _adapter(single)
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().reshape(-1) for k in sorted(a)])
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (diff.max(), diff.mean())


@pytest.mark.slow
def test_sft_under_torchrun_writes_the_one_process_adapter(tiny_model_dir, tmp_path):
    rng = random.Random(3)
    words = ["red", "green", "blue", "cat", "sky", "tree", "river", "song"]
    data = tmp_path / "sft.jsonl"  # responses of 1-9 words: the ranks' token shares differ
    data.write_text("".join(json.dumps({
        "prompt": f"Say {i}.", "response": " ".join(rng.choices(words, k=rng.randint(1, 9)))})
        + "\n" for i in range(12)))
    common = ["train", "sft", "--model", str(tiny_model_dir), "--data", str(data), "--epochs",
              "1", "--batch-size", "4", "--lr", "1e-3", "--lora-r", "4", "--no-packing"]
    two = _command(_torchrun("-m", "rlhf.cli", *common, "--out", str(tmp_path / "two")))
    _command([sys.executable, "-m", "rlhf.cli", *common, "--out", str(tmp_path / "one")])
    assert two.strip() == str((tmp_path / "two").resolve())  # printed once, by rank 0
    _same_adapter(tmp_path / "two", tmp_path / "one")
    losses = [json.loads((tmp_path / run / "sft_metrics.jsonl").read_text())["loss"]
              for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], rel=STATS_REL)


@pytest.mark.slow
def test_reward_model_under_torchrun_writes_the_one_process_model(tiny_model_dir, tmp_path):
    from tests.fixtures.reward_helpers import synthetic_pairs

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(24, seed=4)))
    # 18 training pairs in batches of 8, 8, 2; 6 held out (rank 0 evaluates them).
    common = ["train", "rm", "--model", str(tiny_model_dir), "--data", str(data),
              "--val-fraction", "0.25", "--epochs", "1", "--batch-size", "8", "--lr", "1e-3",
              "--lora-r", "4", "--max-length", "48", "--no-progress"]
    two = _command(_torchrun("-m", "rlhf.cli", *common, "--out", str(tmp_path / "two")))
    _command([sys.executable, "-m", "rlhf.cli", *common, "--out", str(tmp_path / "one")])
    assert two.count("saved reward model") == 1  # rank 0 alone reports and writes
    _same_adapter(tmp_path / "two", tmp_path / "one")
    rows = [json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("two", "one")]
    assert rows[0].keys() == rows[1].keys()
    for key in rows[1]:
        assert rows[0][key] == pytest.approx(rows[1][key], rel=STATS_REL, abs=1e-7), key

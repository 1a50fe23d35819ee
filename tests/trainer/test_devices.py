"""Where the learner computes: the `device` setting (auto, cpu, cuda, cuda:N) and its refusals,
a step on each device against the float32 CPU step, and the frozen base sharded across 2 gloo
ranks with FSDP2 (`shard_base`) against one process.

CUDA cases run where torch.cuda.is_available() and are skipped, saying so, elsewhere.
Tolerances: a CUDA step in float32 adds the same terms in another order than the CPU, so the
data-parallel tolerance (test_ddp.py) holds; in bfloat16 (CUDA's default) the matmuls keep ~3
significant digits, so that step is compared by the direction of its weight change (cosine
> 0.95) and its size (within 5%).
"""

from __future__ import annotations

import json
import os

import grpc
import pytest
import torch
from click.testing import CliRunner

from rlhf.plumbing.config import ConfigError
from services.trainer.distributed import World, backend_for, resolve_device
from services.trainer.ppo.cli import train_ppo
from services.trainer.ppo.learner import Learner
from services.trainer.ppo.settings import PPOSettings
from tests.fixtures.ports import free_port
from tests.trainer.test_ddp import MAX_ABS, MEAN_ABS, STATS_REL, _rollouts, _settings, _trained

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine "
                                "(torch.cuda.is_available() is false)")
no_cuda = pytest.mark.skipif(CUDA, reason="this machine has CUDA: the refusal cannot happen")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


# ------------------------------------------------------------------ the setting


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "gpu", ""])
def test_an_unknown_device_is_a_config_error_naming_the_key(device):
    with pytest.raises(ConfigError, match=r"device: .*must be auto, cpu, cuda or cuda:N"):
        PPOSettings.load(None, device=device)


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_on_a_machine_without_it_is_a_config_error(device):
    with pytest.raises(ConfigError, match=r"device: .*needs a CUDA GPU and this machine has none"):
        PPOSettings.load(None, device=device)


@needs_cuda
def test_a_gpu_the_machine_lacks_is_a_config_error():
    count = torch.cuda.device_count()
    with pytest.raises(ConfigError, match=rf"device: .*this machine has {count} CUDA device"):
        PPOSettings.load(None, device=f"cuda:{count}")


def test_auto_is_cuda_when_available_and_the_default():
    assert PPOSettings.load(None).device == "auto"
    assert resolve_device("auto") == (torch.device("cuda", 0) if CUDA else torch.device("cpu"))
    assert resolve_device("CPU") == torch.device("cpu")
    assert backend_for("auto") == ("nccl" if CUDA else "gloo")
    assert backend_for("cpu") == "gloo"


@needs_cuda
def test_under_torchrun_each_rank_takes_its_local_gpu():
    ranks = World(rank=1, size=2, local_rank=0)
    assert resolve_device("cuda", ranks) == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"device: 'cuda:0' would put all 2 ranks on one GPU"):
        resolve_device("cuda:0", ranks)


def test_the_rules_on_a_node_with_two_gpus(monkeypatch):
    """The device each rank takes, with torch told the node has 2 GPUs (the rules alone: no
    tensor is made; the test above does it on a real GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    one = World()
    assert resolve_device("auto", one) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", one) == torch.device("cuda", 1)
    assert backend_for("auto") == backend_for("cuda") == "nccl"
    assert [resolve_device("cuda", World(rank=r, size=4, local_rank=r % 2)) for r in range(4)] == [
        torch.device("cuda", 0), torch.device("cuda", 1)] * 2
    with pytest.raises(ConfigError, match=r"device: 'cuda:2' does not exist: this machine has 2"):
        resolve_device("cuda:2", one)
    with pytest.raises(ConfigError, match=r"device: 'cuda:1' would put all 4 ranks on one GPU"):
        resolve_device("cuda:1", World(rank=0, size=4, local_rank=0))
    with pytest.raises(ConfigError, match=r"device: rank 2 has LOCAL_RANK 2 but this node has 2"):
        resolve_device("cuda", World(rank=2, size=3, local_rank=2))


def test_the_command_refuses_a_bad_device_before_starting(tmp_path):
    result = CliRunner().invoke(train_ppo, ["--device", "tpu", "--steps", "1"])
    assert result.exit_code == 2
    assert "device:" in result.output and "must be auto, cpu, cuda or cuda:N" in result.output
    assert "Traceback" not in result.output


@no_cuda
async def test_start_run_on_cuda_without_it_is_invalid_argument(tiny_model_dir, short_prompts,
                                                                 tmp_path):
    from rlhf.plumbing.server import GrpcServer
    from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=tmp_path,
                             model=tiny_model_dir, prompts=short_prompts,
                             policy_addr=["127.0.0.1:1"], reward_addr=["127.0.0.1:1"],
                             drain_grace_seconds=1, insecure_no_auth=True)
    server = await GrpcServer(cfg, TrainerApp(cfg)).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StartRun(trainer_pb2.StartRunRequest(
                    run_id="on-cuda", config=trainer_pb2.RunConfig(device="cuda")))
    finally:
        await server.shutdown()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device" in err.value.details() and "CUDA" in err.value.details()


def test_run_config_carries_the_device_settings(tiny_model_dir, short_prompts, tmp_path):
    from rlhf.v1 import trainer_pb2
    from services.trainer.config import TrainerConfig
    from services.trainer.ppo.runs import settings_from_proto, settings_to_proto

    cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=tmp_path,
                             model=tiny_model_dir, prompts=short_prompts,
                             policy_addr=["127.0.0.1:1"], reward_addr=["127.0.0.1:1"],
                             insecure_no_auth=True)
    settings = settings_from_proto(trainer_pb2.RunConfig(
        device="cpu", compute_dtype="bfloat16", micro_batch_size=2,
        gradient_checkpointing=True), cfg, "r")
    assert (settings.device, settings.compute_dtype, settings.micro_batch_size,
            settings.gradient_checkpointing) == ("cpu", "bfloat16", 2, True)
    back = settings_to_proto(settings)
    assert (back.device, back.compute_dtype, back.micro_batch_size,
            back.gradient_checkpointing) == ("cpu", "bfloat16", 2, True)
    defaults = settings_from_proto(trainer_pb2.RunConfig(), cfg, "r")
    assert (defaults.device, defaults.compute_dtype, defaults.micro_batch_size,
            defaults.gradient_checkpointing) == ("auto", "auto", None, False)
    # The trainer's own YAML (TrainerConfig) sets the device of runs that name none.
    pinned = cfg.model_copy(update={"device": "cpu"})
    assert settings_from_proto(trainer_pb2.RunConfig(), pinned, "r").device == "cpu"
    from rlhf.plumbing.errors import InvalidArgument

    for field, value in (("device", "tpu"), ("compute_dtype", "fp8"),
                         ("micro_batch_size", 10**9)):
        with pytest.raises(InvalidArgument, match=field):
            settings_from_proto(trainer_pb2.RunConfig(**{field: value}), cfg, "r")


# ------------------------------------------------------------------ a step on each device


def _step(model_dir, root, algo: str, **overrides):
    n_prompts, per_prompt = {"ppo": (5, 1), "grpo": (3, 2)}[algo]
    settings = _settings(model_dir, root, algo, per_prompt).model_copy(update=overrides)
    learner = Learner(settings, world_=World())
    learner._build()
    before = {k: v.cpu() for k, v in _trained(learner).items()}
    stats = learner.update(_rollouts(n_prompts, per_prompt))
    after = {k: v.cpu() for k, v in _trained(learner).items()}
    names = sorted(before)
    return (torch.cat([before[k].reshape(-1) for k in names]),
            torch.cat([after[k].reshape(-1) for k in names]), stats, learner)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["ppo", "grpo"])
def test_a_float32_step_on_the_device_matches_the_cpu_step(tiny_model_dir, tmp_path, device,
                                                          algo):
    before, cpu, cpu_stats, _ = _step(tiny_model_dir, tmp_path, algo, device="cpu",
                                      compute_dtype="float32")
    _, on_device, stats, learner = _step(tiny_model_dir, tmp_path, algo, device=device,
                                         compute_dtype="float32")
    # Everything the learner trains lives on the device.
    assert {p.device.type for p in learner.model.parameters()} == {device}
    assert all(p.dtype == torch.float32 for p in learner.model.trainable_parameters())
    assert (cpu - before).abs().mean() > 5e-4
    diff = (on_device - cpu).abs()
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (diff.max(), diff.mean())
    for key in ("reward/mean", "kl/ref", "loss/policy", "loss/value", "policy/entropy"):
        assert stats[key] == pytest.approx(cpu_stats[key], rel=STATS_REL, abs=1e-6), key


@pytest.mark.parametrize(("device", "dtype"), [
    ("cpu", "auto"), ("cpu", "bfloat16"), pytest.param("cuda", "auto", marks=needs_cuda)])
def test_the_default_dtype_step_on_the_device_trains_like_the_cpu_step(tiny_model_dir, tmp_path,
                                                                       device, dtype):
    """compute_dtype auto: float32 on the CPU (the same step), bfloat16 on CUDA (the same
    direction and size of change, LoRA and optimizer state in float32). bfloat16 on the CPU
    (autocast) measured cosine 0.987 and a norm within 0.2% of the float32 step; a step that
    trained other rows or the wrong way would be near 0 or negative."""
    before, cpu, _, _ = _step(tiny_model_dir, tmp_path, "grpo", device="cpu",
                              compute_dtype="float32")
    _, got, stats, learner = _step(tiny_model_dir, tmp_path, "grpo", device=device,
                                   compute_dtype=dtype)
    assert all(p.dtype == torch.float32 for p in learner.model.trainable_parameters())
    assert all(s.dtype == torch.float32 for state in learner.optimizer.state.values()
               for s in state.values() if torch.is_tensor(s) and s.dim() > 0)
    if (device, dtype) == ("cpu", "auto"):
        assert learner.model.autocast is None and torch.equal(got, cpu)
        return
    assert learner.model.autocast == torch.bfloat16
    ref, moved = cpu - before, got - before
    assert torch.nn.functional.cosine_similarity(ref, moved, dim=0) > 0.95
    assert float(moved.norm()) == pytest.approx(float(ref.norm()), rel=0.05)
    assert stats["memory/peak_gb"] > 0


# ------------------------------------------------------------------ FSDP2 over 2 gloo ranks


def _fsdp_rank(rank: int, size: int, port: int, settings, samples, out) -> None:
    """One rank of a sharded-base step (spawned); rank 0 first does the one-process step."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from services.trainer.distributed import world

    torch.set_num_threads(1)
    if rank == 0:
        single = Learner(settings.model_copy(update={"shard_base": False}), world_=World())
        single._build()
        single._resume()
        stats = single.update(samples)
        single.model.save_policy_adapter(out / "single-adapter")
        torch.save({"after": _trained(single), "stats": stats}, out / "single.pt")
        del single
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    try:
        learner = Learner(settings, world_=world())
        learner._build()
        learner._resume()
        trained = {id(p) for p in learner.model.trainable_parameters()}
        frozen = [p for p in learner.model.parameters() if id(p) not in trained]
        if rank == 0:
            stats = learner._update_all(samples)
            learner.world.broadcast_object(None)
            learner.model.save_policy_adapter(out / "sharded-adapter")
        else:
            learner._follow()
            stats = None
        torch.save({"after": _trained(learner), "stats": stats, "sharded": learner.model.sharded,
                    "frozen_dtensors": sum(isinstance(p, DTensor) for p in frozen),
                    "frozen": len(frozen),
                    "trainable_dtensors": sum(isinstance(p, DTensor)
                                              for p in learner.model.trainable_parameters())},
                   out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "n_prompts", "per_prompt", "extra"), [
    ("ppo", 5, 1, {"micro_batch_size": 2}),       # uneven shards: 3 and 2 rows, lockstep
    ("grpo", 3, 2, {"gradient_checkpointing": True}),
])
def test_a_sharded_base_makes_the_one_process_update(tiny_model_dir, tmp_path, algo, n_prompts,
                                                     per_prompt, extra):
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    settings = _settings(tiny_model_dir, tmp_path, algo, per_prompt).model_copy(
        update={"shard_base": True, "device": "cpu", **extra})
    samples = _rollouts(n_prompts, per_prompt)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_fsdp_rank, args=(2, free_port(), settings, samples, tmp_path), nprocs=2,
                       join=True, start_method="spawn")

    single = torch.load(tmp_path / "single.pt")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r in ranks:  # the frozen base really was sharded, the trained weights were not
        assert r["sharded"] and r["frozen_dtensors"] == r["frozen"] > 0
        assert r["trainable_dtensors"] == 0
    names = sorted(single["after"])

    def flat(d):
        return torch.cat([d[n].reshape(-1) for n in names])

    diff = (flat(ranks[0]["after"]) - flat(single["after"])).abs()
    assert diff.max() <= MAX_ABS and diff.mean() <= MEAN_ABS, (diff.max(), diff.mean())
    assert torch.equal(flat(ranks[0]["after"]), flat(ranks[1]["after"]))
    for key, value in single["stats"].items():
        if not key.startswith("memory/"):
            assert ranks[0]["stats"][key] == pytest.approx(value, rel=STATS_REL, abs=1e-7), key
    # The adapter rank 0 saves from the sharded model is the one-process adapter.
    a = load_file(str(tmp_path / "sharded-adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "single-adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= MAX_ABS
    cfg = json.loads((tmp_path / "sharded-adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == settings.lora_rank

"""The learner's peers without vLLM, for trainer tests: a real policy gRPC server (push checks,
versions, base model id) over the policy's FakeEngine, and a real reward server with a rule
scorer; both on 127.0.0.1, optionally with TLS. And a small, fast run's settings."""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from rlhf.plumbing.config import ServerTLS
from rlhf.plumbing.server import GrpcServer
from tests.fixtures.policy_helpers import ADMIN


@asynccontextmanager
async def peers(model_dir: Path, data_dir: Path, tls: ServerTLS | None = None,
                scorer: str = "rule:length?target=20&unit=chars"):
    """(policy address, reward address) of a FakeEngine policy serving `model_dir` and a reward
    with `scorer` (a rule by default), for the duration of the block."""
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig
    from services.policy.fake_engine import FakeEngine
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig

    common = dict(grpc_port=0, metrics_port=0, drain_grace_seconds=1,
                  tls=tls or ServerTLS())
    pcfg = PolicyConfig.load(model=model_dir, data_dir=data_dir / "policy", max_model_len=512,
                             admin_token=ADMIN, **common)
    policy = await GrpcServer(pcfg, PolicyApp(pcfg, engine=FakeEngine(vocab_size=512))).start()
    rcfg = RewardConfig.load(scorer=[scorer], **common)
    reward = await GrpcServer(rcfg, RewardApp(rcfg)).start()
    try:
        yield f"127.0.0.1:{policy.port}", f"127.0.0.1:{reward.port}"
    finally:
        await reward.shutdown()
        await policy.shutdown()


def run_settings(model_dir: Path, prompts: Path, out: Path, policy_addr: str, reward_addr: str,
                 **overrides):
    """A small, fast run (2 prompts x 2 samples x 4 tokens per step)."""
    from services.trainer.ppo.settings import PPOSettings

    values = dict(model=model_dir, prompts=prompts, out=out, policy_addr=[policy_addr],
                  reward_addr=[reward_addr], admin_token=ADMIN, steps=3, prompts_per_step=2,
                  samples_per_prompt=2, max_new_tokens=4, ppo_epochs=1, minibatch_size=4,
                  lora_rank=4, seed=1, adapter_name=out.name, retry_max_seconds=5,
                  keep_checkpoints=10)
    values.update(overrides)
    return PPOSettings.load(None, **values)

"""Session fixtures for policy tests: one real policy server per adapter mode (vLLM, tiny model,
fp32, eager), shared by every test that needs it, and a few random adapters for the tiny model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

__all__ = ["tiny_adapters", "policy_lora", "policy_merged", "PolicyHandle"]


@dataclass
class PolicyHandle:
    server: object
    channel: grpc.aio.Channel
    model_dir: Path
    data_dir: Path

    @property
    def app(self):
        return self.server.app

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> list[Path]:
    from tests.policy_helpers import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, root / f"a{i}", seed=100 + i) for i in range(4)]


async def _start(tiny_model_dir, tmp_path_factory, mode: str):
    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig
    from tests.policy_helpers import ADMIN

    data_dir = tmp_path_factory.mktemp(f"policy-{mode}")
    cfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=tiny_model_dir, data_dir=data_dir,
        max_model_len=512, adapter_mode=mode, admin_token=ADMIN, keep_versions=3,
        max_loaded_adapters=6, max_num_seqs=32, default_max_tokens=16, drain_grace_seconds=5,
    )
    server = await GrpcServer(cfg, PolicyApp(cfg)).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return PolicyHandle(server, channel, tiny_model_dir, data_dir)


@pytest.fixture(scope="session")
async def policy_lora(tiny_model_dir, tmp_path_factory, vllm_cpu_env):
    handle = await _start(tiny_model_dir, tmp_path_factory, "lora")
    yield handle
    await handle.channel.close()
    await handle.server.shutdown()


@pytest.fixture(scope="session")
async def policy_merged(tiny_model_dir, tmp_path_factory, vllm_cpu_env):
    handle = await _start(tiny_model_dir, tmp_path_factory, "merged")
    yield handle
    await handle.channel.close()
    await handle.server.shutdown()

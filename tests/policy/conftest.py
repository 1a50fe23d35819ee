"""Policy-only fixtures: a real policy gRPC server on 127.0.0.1 over a FakeEngine (no model
weights run), one per test, in either adapter mode. The real-vLLM servers are session fixtures in
tests/fixtures/policy.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from rlhf.plumbing.server import GrpcServer
from services.policy.app import PolicyApp
from services.policy.config import PolicyConfig
from services.policy.fake_engine import FakeEngine
from tests.fixtures.policy_helpers import ADMIN


@dataclass
class FakePolicy:
    server: GrpcServer
    channel: grpc.aio.Channel
    engine: FakeEngine
    model_dir: Path
    data_dir: Path

    @property
    def app(self) -> PolicyApp:
        return self.server.app

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.server.port}"


async def start_fake_policy(model_dir: Path, data_dir: Path, mode: str = "lora",
                            engine: FakeEngine | None = None, **overrides) -> FakePolicy:
    settings = dict(
        grpc_port=0, metrics_port=0, model=model_dir, data_dir=data_dir, max_model_len=512,
        adapter_mode=mode, admin_token=ADMIN, keep_versions=3, max_loaded_adapters=6,
        default_max_tokens=16, drain_grace_seconds=1,
    )
    cfg = PolicyConfig.load(**{**settings, **overrides})
    engine = engine or FakeEngine(vocab_size=512, max_model_len=cfg.max_model_len)
    server = await GrpcServer(cfg, PolicyApp(cfg, engine=engine)).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return FakePolicy(server, channel, engine, model_dir, data_dir)


async def stop_fake_policy(policy: FakePolicy) -> None:
    await policy.channel.close()
    await policy.server.shutdown()


@pytest.fixture
async def fake_policy(tiny_model_dir, tmp_path):
    """lora mode, admin token tests.fixtures.policy_helpers.ADMIN."""
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data")
    yield policy
    await stop_fake_policy(policy)


@pytest.fixture
async def fake_merged(tiny_model_dir, tmp_path):
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data", mode="merged")
    yield policy
    await stop_fake_policy(policy)

"""The policy as a real process: kept adapters and the active version survive a restart."""

from __future__ import annotations

import asyncio
import os
import signal

import grpc
import psutil
import pytest

from rlhf.clients.push import push_adapter
from rlhf.v1 import policy_pb2
from tests.fixtures.grpc_helpers import read_until, start_process
from tests.fixtures.policy_helpers import ADMIN, AUTH, generate_greedy, hf_greedy, stub, version_of
from tests.fixtures.ports import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
PROMPT = [20, 21, 22, 23, 24]


def _start(tiny_model_dir, data_dir, port, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env["RLHF_POLICY_ADMIN_TOKEN"] = ADMIN
    proc = start_process([
        "-m", "services.policy", "--port", str(port), "--metrics-port", "0",
        "--model", str(tiny_model_dir), "--data-dir", str(data_dir), "--max-model-len", "512",
        *extra,
    ], env=env)
    read_until(proc, "READY policy", timeout=240)
    return proc


class _Handle:
    def __init__(self, channel, model_dir):
        self.channel, self.model_dir = channel, model_dir


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_adapters_and_active_version_survive_restart(tiny_model_dir, tiny_adapters, tmp_path):
    port = free_port()
    data_dir = tmp_path / "data"

    async def first_life():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            await push_adapter(ch, tiny_adapters[0], "persist", 1, "tiny", token=ADMIN)
            await push_adapter(ch, tiny_adapters[1], "persist", 2, "tiny", token=ADMIN)
            await stub(ch).SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(
                adapter=policy_pb2.AdapterRef(name="persist", version=1)), metadata=AUTH)
            return await generate_greedy(_Handle(ch, tiny_model_dir), 8)

    async def second_life():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            listed = await stub(ch).ListAdapters(policy_pb2.ListAdaptersRequest())
            pinned_v2 = policy_pb2.AdapterSelector(
                target=policy_pb2.ADAPTER_TARGET_PINNED,
                pinned=policy_pb2.AdapterRef(name="persist", version=2))
            h = _Handle(ch, tiny_model_dir)
            return (listed, await generate_greedy(h, 8), await generate_greedy(h, 8, pinned_v2))

    proc = _start(tiny_model_dir, data_dir, port)
    try:
        before = asyncio.run(first_life())
    finally:
        _stop(proc)
    assert before == (hf_greedy(tiny_model_dir, tiny_adapters[0], PROMPT, 8), ("persist", 1))

    # The second life also runs confined to one core: the service and its engine core process
    # (where the model computes) may use only that core.
    core = max(os.sched_getaffinity(0))
    proc = _start(tiny_model_dir, data_dir, port, "--cpu-cores", str(core))
    try:
        placement = {p.pid: p.cpu_affinity()
                     for p in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(True)]}
        listed, active, v2 = asyncio.run(second_life())
    finally:
        _stop(proc)
    assert len(placement) >= 2 and all(cores == [core] for cores in placement.values()), placement
    assert [(a.adapter.version, a.active) for a in listed.adapters] == [(1, True), (2, False)]
    assert version_of(listed.active) == ("persist", 1)
    assert active == before
    assert v2 == (hf_greedy(tiny_model_dir, tiny_adapters[1], PROMPT, 8), ("persist", 2))

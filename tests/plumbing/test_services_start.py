"""Each service starts as `python -m services.<name>` (and `rlhf serve <name>`), reports health,
answers GetInfo, says clearly what is not implemented yet, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest

from rlhf import __version__
from rlhf.v1 import (
    reward_pb2,
    reward_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.fixtures.grpc_helpers import health_status, read_until, start_process
from tests.fixtures.ports import free_port


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env["RLHF_HOME"] = str(tmp_path)
    return env


async def _probe(port: int, name: str):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        overall = await health_status(ch)
        named = await health_status(ch, f"rlhf.v1.{name.capitalize()}Service")
        if name == "reward":
            info = await reward_pb2_grpc.RewardServiceStub(ch).GetInfo(
                reward_pb2.RewardServiceGetInfoRequest(), timeout=5
            )
            pending = reward_pb2_grpc.RewardServiceStub(ch).Score(
                reward_pb2.ScoreRequest(), timeout=5
            )
        else:
            info = None
            pending = trainer_pb2_grpc.TrainerServiceStub(ch).GetRun(
                trainer_pb2.GetRunRequest(run_id="x"), timeout=5
            )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pending
        return overall, named, info, err.value


@pytest.mark.parametrize("name", ["reward", "trainer"])
def test_service_starts_serves_health_and_stops(name, tmp_path):
    port, mport = free_port(), free_port()
    proc = start_process(
        ["-m", f"services.{name}", "--port", str(port), "--metrics-port", str(mport),
         *(["--insecure-no-auth"] if name == "trainer" else [])],
        env=_env(tmp_path),
    )
    try:
        line = read_until(proc, f"READY {name}")
        assert f"grpc={port}" in line and f"metrics={mport}" in line
        overall, named, info, err = asyncio.run(_probe(port, name))
        assert overall == named == "SERVING"
        if info is not None:
            assert info.server.service == name
            assert info.server.version == __version__
            assert info.server.api_version == "rlhf.v1"
            assert info.server.ready
        if name == "reward":  # a reward service with no scorers says what is missing
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "no scorers configured" in err.details()
        else:
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert "no run 'x'" in err.details()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert "Traceback" not in out, out


def test_rlhf_serve_uses_the_same_command(tmp_path):
    port = free_port()
    rlhf = str(Path(sys.executable).parent / "rlhf")
    import subprocess

    proc = subprocess.Popen(
        [rlhf, "serve", "reward", "--port", str(port), "--metrics-port", "0",
         "--log-format", "json"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp_path),
    )
    try:
        read_until(proc, "READY reward")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert '"msg": "reward stopped"' in out


def test_port_in_use_fails_with_a_message(tmp_path):
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        proc = start_process(
            ["-m", "services.trainer", "--port", str(taken), "--metrics-port", "0",
             "--insecure-no-auth"],
            env=_env(tmp_path),
        )
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"cannot bind gRPC port 127.0.0.1:{taken}" in out
    assert "Traceback" not in out


def test_policy_without_a_model_fails_with_a_message(tmp_path):
    proc = start_process(
        ["-m", "services.policy", "--port", "0", "--metrics-port", "0",
         "--model", str(tmp_path / "no-model"), "--insecure-no-auth"],
        env=_env(tmp_path),
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert f"model folder {tmp_path / 'no-model'} not found" in out
    assert "rlhf model prepare" in out
    assert "Traceback" not in out


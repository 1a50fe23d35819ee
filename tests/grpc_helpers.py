"""Client-side helpers for tests: health checks, raw calls, waiting for a port."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


async def health_status(channel: grpc.aio.Channel, service: str = "") -> str:
    stub = health_pb2_grpc.HealthStub(channel)
    resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def raw_unary(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(method)


async def wait_serving(target: str, service: str = "", timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        async with grpc.aio.insecure_channel(target) as ch:
            try:
                if await health_status(ch, service) == "SERVING":
                    return
            except grpc.aio.AioRpcError as exc:
                last = exc
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{target} not SERVING after {timeout}s (last error {last})")


def start_process(args: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env,
    )


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 60.0) -> str:
    """Reads the process's output until a line containing marker; returns that line."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if marker in line:
            return line
    raise AssertionError(f"{marker!r} not seen; output:\n{''.join(seen)}")

"""Client channels: several replicas balanced per call, dns:/// names resolved to endpoints."""

from __future__ import annotations

import pytest

from rlhf.plumbing.channel import endpoints, make_channel, target_for
from rlhf.plumbing.server import GrpcServer
from tests.fixtures.slow_app import SlowApp, SlowConfig


def test_target_for():
    assert target_for("127.0.0.1:1") == "127.0.0.1:1"
    assert target_for("dns:///policy:50051") == "dns:///policy:50051"
    assert target_for(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert target_for("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert target_for(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="dns:///"):
        target_for(["policy-0:1", "policy-1:1"])
    with pytest.raises(ValueError, match="host:port"):
        target_for(["127.0.0.1", "127.0.0.2:1"])
    with pytest.raises(ValueError, match="no address"):
        target_for([])


def test_endpoints_resolve_dns_names():
    assert "127.0.0.1:5000" in endpoints("dns:///localhost:5000")
    deduped = endpoints(["127.0.0.1:1", "127.0.0.1:1", "127.0.0.2:1"])
    assert deduped == ["127.0.0.1:1", "127.0.0.2:1"]
    assert endpoints("ipv4:127.0.0.1:1,127.0.0.2:2") == ["127.0.0.1:1", "127.0.0.2:2"]


async def test_calls_are_balanced_across_replicas():
    servers = []
    for _ in range(2):
        cfg = SlowConfig.load(grpc_port=0, metrics_enabled=False, drain_grace_seconds=1)
        servers.append(await GrpcServer(cfg, SlowApp()).start())
    try:
        addrs = [f"127.0.0.1:{s.port}" for s in servers]
        async with make_channel(addrs) as ch:
            for _ in range(20):
                assert await ch.unary_unary("/test.Slow/Sleep")(b"0", timeout=5) == b"0"
        counts = [len(s.app.seen_request_ids) for s in servers]
        assert sum(counts) == 20
        assert min(counts) >= 5, counts  # round_robin, not pick_first
    finally:
        for s in servers:
            await s.shutdown()

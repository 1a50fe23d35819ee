"""An adapter push goes to every policy replica; refusals are recorded and the quorum decides.
A push's outcome never narrows which replicas later Generate calls use: rollouts pinned to a
version stay balanced over all replicas, and a replica that lacks the version (it refused that
push) passes the call on to one that confirmed it. Replicas are FakePolicy servers on 127.0.0.1."""

from __future__ import annotations

import pytest

from services.trainer.clients import GaveUp, Services
from tests.clients.helpers import FakePolicy, adapter_folder, serve
from tests.fixtures.ports import free_port


@pytest.fixture
async def replicas():
    ports = [free_port() for _ in range(3)]
    fakes = [FakePolicy(name) for name in "abc"]
    servers = [await serve(fake, port) for fake, port in zip(fakes, ports, strict=True)]
    yield [f"127.0.0.1:{p}" for p in ports], fakes
    for server in servers:
        await server.stop(0)


async def _rollouts(services: Services, version: int, calls: int) -> list[int]:
    """Served-by versions of `calls` pinned Generate calls of one prompt each."""
    record = type("Record", (), {"prompt": "hi", "messages": None, "meta": {}})()
    out = []
    for i in range(calls):
        samples = await services.generate([record], 1, 4, 1.0, seed=i, version=version)
        out += [s.adapter_version for s in samples]
    return out


async def test_push_quorum_refusals_and_pinned_rollouts(replicas, tmp_path):
    addrs, (a, b, c) = replicas
    folder = adapter_folder(tmp_path)
    services = Services(addrs, [f"127.0.0.1:{free_port()}"], "run", retry_max=30)
    try:
        c.refuse = True
        first = await services.push(folder, 1, "tiny", None, quorum=0.6, attempts=2)
        assert first.confirmed == addrs[:2]
        assert first.refused == {addrs[2]: "INVALID_ARGUMENT: rank 64 exceeds max 16"}
        assert c.pushed == [1, 1]  # the refusal was tried again
        with pytest.raises(GaveUp, match=f"confirmed by 2 of 3 .*{addrs[2]}.*INVALID_ARGUMENT"):
            await services.push(folder, 2, "tiny", None, quorum=1.0, attempts=1)

        # The refused replica is pushed the next version like the others; this time another
        # replica refuses it.
        c.refuse, a.refuse = False, True
        third = await services.push(folder, 3, "tiny", None, quorum=0.6, attempts=1)
        assert third.confirmed == addrs[1:] and list(third.refused) == [addrs[0]]
        assert c.pushed[-1] == 3

        # Rollouts pinned to v1 (held by a, b) and v3 (held by b, c) both succeed: after the
        # push of v3 a v1 rollout still reaches a replica that holds v1.
        assert await _rollouts(services, 1, 12) == [1] * 12
        assert await _rollouts(services, 3, 12) == [3] * 12
        # Every replica was asked: Generate stays balanced over all configured replicas.
        assert all(r.generate_calls > 0 for r in (a, b, c))
        assert a.served > 0 and c.served > 0  # each served the version it holds
    finally:
        await services.close()

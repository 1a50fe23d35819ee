"""Whether a started service is ready: gRPC health SERVING for policy, reward and trainer (through
the typed client of that service), HTTP 200 from the gateway's /readyz (which needs policy and
reward). A probe never raises: a service not answering yet is simply not ready."""

from __future__ import annotations

from rlhf.stack.plan import ServiceSpec

PROBE_TIMEOUT = 3.0


async def grpc_serving(kind: str, addr: str, timeout: float = PROBE_TIMEOUT) -> bool:
    from rlhf.clients import PolicyClient, RewardClient, TrainerClient

    client_class = {"policy": PolicyClient, "reward": RewardClient,
                    "trainer": TrainerClient}[kind]
    async with client_class(addr) as client:
        return await client.serving(timeout)


async def http_ok(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    import httpx

    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False


async def ready(spec: ServiceSpec) -> bool:
    if spec.kind == "gateway":
        return await http_ok(f"{spec.url}/readyz")
    return await grpc_serving(spec.kind, spec.addr)

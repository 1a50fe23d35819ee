"""Admin auth on a real policy server (FakeEngine): PushAdapter and SetActiveAdapter need
`authorization: Bearer <admin_token>`; a missing or malformed header is UNAUTHENTICATED, a wrong
token PERMISSION_DENIED, and nothing changes. The interceptor (rlhf/plumbing/auth.py) knows no
service: the last test guards a streaming method with it."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest

from rlhf.clients.push import push_requests
from rlhf.plumbing.auth import AdminAuthInterceptor, bearer_metadata
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import policy_pb2
from services.policy.app import SERVICE_NAME, PolicyApp
from services.policy.config import PolicyConfig
from services.policy.fake_engine import FakeEngine
from tests.fixtures.policy_helpers import ADMIN, AUTH, greedy, stub, text_prompt
from tests.policy.conftest import start_fake_policy, stop_fake_policy

REFUSED = {
    "no header": ((), grpc.StatusCode.UNAUTHENTICATED, "send the admin token"),
    "wrong token": ((("authorization", "Bearer wrong"),), grpc.StatusCode.PERMISSION_DENIED,
                    "the admin token is wrong"),
    "token of another length": ((("authorization", f"Bearer {ADMIN}x"),),
                                grpc.StatusCode.PERMISSION_DENIED, "the admin token is wrong"),
    "not a bearer token": ((("authorization", f"Basic {ADMIN}"),),
                           grpc.StatusCode.UNAUTHENTICATED, "malformed"),
    "empty bearer": ((("authorization", "Bearer "),), grpc.StatusCode.UNAUTHENTICATED,
                     "malformed"),
    "the token without a scheme": ((("authorization", ADMIN),), grpc.StatusCode.UNAUTHENTICATED,
                                   "malformed"),
    "an x-admin-token header": ((("x-admin-token", ADMIN),), grpc.StatusCode.UNAUTHENTICATED,
                                "send the admin token"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_model_changes_without_the_right_token_are_refused(fake_policy, tiny_adapters,
                                                                 case):
    metadata, code, words = REFUSED[case]
    s = stub(fake_policy.channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.PushAdapter(push_requests(tiny_adapters[0], "auth", 1, "tiny"),
                            metadata=metadata, timeout=30)
    assert (err.value.code(), words in err.value.details()) == (code, True), err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(base=True),
                                 metadata=metadata, timeout=30)
    assert (err.value.code(), words in err.value.details()) == (code, True), err.value.details()
    listed = await s.ListAdapters(policy_pb2.ListAdaptersRequest(name="auth"))
    assert not listed.adapters and listed.next_version == 1
    assert fake_policy.engine.added == []
    assert not (fake_policy.data_dir / "policy" / "adapters" / "auth").exists()


async def test_the_right_token_is_let_through_and_reads_need_none(fake_policy, tiny_adapters):
    s = stub(fake_policy.channel)
    pushed = await s.PushAdapter(push_requests(tiny_adapters[0], "auth", 1, "tiny"),
                                 metadata=AUTH, timeout=30)
    assert pushed.activated and fake_policy.engine.added == ["auth@v1"]
    # Lower-case scheme: RFC 6750 makes it case-insensitive.
    switched = await s.SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(base=True),
                                        metadata=(("authorization", f"bearer {ADMIN}"),),
                                        timeout=30)
    assert switched.active.base
    listed = await s.ListAdapters(policy_pb2.ListAdaptersRequest(name="auth"), timeout=30)
    assert [a.adapter.version for a in listed.adapters] == [1]
    await s.GetInfo(policy_pb2.PolicyServiceGetInfoRequest(), timeout=30)
    await s.Generate(policy_pb2.GenerateRequest(prompts=[text_prompt("x")], params=greedy(2)),
                     timeout=30)


async def test_refusals_are_counted_in_the_rpc_metrics(fake_policy):
    with pytest.raises(grpc.aio.AioRpcError):
        await stub(fake_policy.channel).SetActiveAdapter(
            policy_pb2.SetActiveAdapterRequest(base=True), timeout=30)
    url = f"http://127.0.0.1:{fake_policy.server.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    assert ('rlhf_policy_grpc_requests_total{code="UNAUTHENTICATED",method="SetActiveAdapter"}'
            in body)


async def test_with_insecure_no_auth_model_changes_are_open(tiny_model_dir, tiny_adapters,
                                                                  tmp_path):
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data", admin_token=None,
                                     insecure_no_auth=True)
    try:
        pushed = await stub(policy.channel).PushAdapter(
            push_requests(tiny_adapters[0], "open", 1, "tiny"), timeout=30)
        assert pushed.activated
    finally:
        await stop_fake_policy(policy)


async def test_the_interceptor_guards_any_kind_of_method(tiny_model_dir, tmp_path):
    """Service-neutral: given a token and full method names, it guards them, streaming ones
    included, and leaves the others alone."""
    cfg = PolicyConfig.load(grpc_port=0, metrics_port=0, model=tiny_model_dir,
                            data_dir=tmp_path / "data", max_model_len=512, drain_grace_seconds=1,
                            insecure_no_auth=True)
    app = PolicyApp(cfg, engine=FakeEngine(vocab_size=512))
    app.interceptors = (AdminAuthInterceptor("s3cret", {f"/{SERVICE_NAME}/GenerateStream"}),)
    server = await GrpcServer(cfg, app).start()
    request = policy_pb2.GenerateStreamRequest(prompt=text_prompt("x"), params=greedy(3))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            s = stub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in s.GenerateStream(request, timeout=30):
                    pass
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            chunks = [c async for c in s.GenerateStream(
                request, metadata=bearer_metadata("s3cret"), timeout=30)]
            assert chunks[-1].usage.completion_tokens == 3
            await s.Generate(policy_pb2.GenerateRequest(prompts=[text_prompt("x")],
                                                        params=greedy(2)), timeout=30)
            # Unguarded here, so open: the policy's own guard list was replaced.
            await s.SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(base=True), timeout=30)
    finally:
        await server.shutdown()


def test_the_interceptor_needs_a_token_and_full_method_names():
    with pytest.raises(ValueError, match="non-empty token"):
        AdminAuthInterceptor("", {f"/{SERVICE_NAME}/PushAdapter"})
    with pytest.raises(ValueError, match="/package.Service/Method"):
        AdminAuthInterceptor("t", {"PushAdapter"})

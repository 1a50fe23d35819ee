"""Security drills for the policy replica and the servers' bounds (24.5, 24.6, 24.7, 24.9, 24.11).

Real policy servers on 127.0.0.1 over the FakeEngine (its request path, admission, leases, push
checks and restore are the real ones), and one over vLLM on the tiny model for restoring an
adapter that does not fit the base. Each drill is an attack or a fault with its expected refusal
or recovery.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import save_file

from rlhf.clients.push import push_requests
from rlhf.v1 import policy_pb2
from services.policy.fake_engine import FakeEngine
from tests.fixtures.grpc_helpers import health_status
from tests.fixtures.policy_helpers import (
    ADMIN,
    AUTH,
    generate_greedy,
    greedy,
    ids_prompt,
    pinned,
    stub,
    text_prompt,
)
from tests.policy.conftest import start_fake_policy, stop_fake_policy

META = "rlhf_adapter.json"


@pytest.fixture
async def policy_replica(tiny_model_dir, tmp_path):
    """A policy replica over the FakeEngine, lora mode, admin token ADMIN."""
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data")
    yield policy
    await stop_fake_policy(policy)


async def _policy_until(predicate, what: str, limit: float = 60.0) -> None:
    for _ in range(int(limit / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not seen within {limit} s: {what}")


async def _policy_push(policy, folder: Path, name: str, version: int, **header):
    messages = list(push_requests(folder, name, version, "tiny", chunk_bytes=4096))
    for key, value in header.items():
        setattr(messages[0].header, key, value)
    return await stub(policy.channel).PushAdapter(iter(messages), metadata=AUTH, timeout=60)


def _policy_listed(policy) -> list[tuple[str, int, bool]]:
    return [(k.handle.name, k.handle.version, k.key == policy.app.registry.active)
            for k in policy.app.registry.kept()]


# ---------------------------------------------------------------------- 24.5 bounded servers


async def test_a_generate_stream_that_is_never_read_releases_admission_and_its_lease(
        tiny_model_dir, tiny_adapters, tmp_path):
    """24.5: a client opens GenerateStream (large responses: n=16, top logprobs) and stops
    reading; within stream_send_timeout_seconds the call ends and gives back its admission and
    its adapter lease, where it used to hold them as long as it kept the stream open."""
    engine = FakeEngine(vocab_size=512, max_model_len=8192)
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data", engine=engine,
                                     max_model_len=8192, stream_send_timeout_seconds=0.5)
    try:
        await _policy_push(policy, tiny_adapters[0], "lease", 1)
        servicer = policy.app.servicer
        req = policy_pb2.GenerateStreamRequest(
            prompt=ids_prompt([7, 8]),
            params=policy_pb2.SamplingParams(n=16, max_tokens=8000, logprobs=True,
                                             top_logprobs=20))
        call = stub(policy.channel).GenerateStream(req, timeout=300)
        await call.read()  # the call runs and holds its admission and lease; no more reads
        assert servicer.admission.pending == 16
        await _policy_until(lambda: servicer.admission.pending == 0, "admission released")
        await _policy_until(lambda: policy.app.registry.kept()[0].in_flight == 0,
                            "adapter lease returned")
        call.cancel()
    finally:
        await stop_fake_policy(policy)


async def test_a_request_larger_than_the_policy_needs_is_resource_exhausted(policy_replica):
    """24.5: a Generate request of 9 MiB (a prompt of token ids far beyond any context) is
    refused by the transport with RESOURCE_EXHAUSTED before the server parses or validates it,
    where the 64 MiB bound let it in."""
    huge = policy_pb2.GenerateRequest(prompts=[ids_prompt([300] * 5_000_000)])
    assert huge.ByteSize() > 9 * 1024 * 1024
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub(policy_replica.channel).Generate(huge, timeout=60)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await health_status(policy_replica.channel) == "SERVING"


async def test_calls_beyond_max_concurrent_rpcs_are_refused_and_health_still_answers(
        tiny_model_dir, tmp_path):
    """24.5: with two slow streams running on a replica bounded to two calls, a third call is
    refused at once with RESOURCE_EXHAUSTED naming the bound, and health probes still answer."""
    engine = FakeEngine(vocab_size=512, token_delay=0.05)
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data", engine=engine,
                                     max_concurrent_rpcs=2)
    try:
        req = policy_pb2.GenerateStreamRequest(prompt=ids_prompt([7, 8]), params=greedy(200))
        calls = [stub(policy.channel).GenerateStream(req, timeout=120) for _ in range(2)]
        for call in calls:
            await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate_greedy(policy, 2)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_rpcs" in err.value.details()
        assert await health_status(policy.channel) == "SERVING"
        for call in calls:
            call.cancel()
    finally:
        await stop_fake_policy(policy)


async def test_a_push_that_stalls_after_its_header_cannot_hold_its_name_forever(
        tiny_model_dir, tiny_adapters, tmp_path):
    """24.5: a push that sends its header and then nothing holds the adapter name's lock; the
    maximum call duration ends it (DEADLINE_EXCEEDED), and the next push of that name goes
    through."""
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data", max_call_seconds=1.0)
    try:
        header = list(push_requests(tiny_adapters[0], "held", 1, "tiny"))[0]
        stalled = asyncio.Event()

        async def stall():
            yield header
            await stalled.wait()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub(policy.channel).PushAdapter(stall(), metadata=AUTH, timeout=120)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "max_call_seconds" in err.value.details()
        stalled.set()
        pushed = await _policy_push(policy, tiny_adapters[0], "held", 1)
        assert pushed.activated
    finally:
        await stop_fake_policy(policy)


async def test_tokenizing_a_huge_prompt_does_not_stop_the_replica_answering(
        tiny_model_dir, tmp_path):
    """24.5: a Generate whose text prompt takes seconds to tokenize (1.9 MB) is tokenized off
    the event loop after admission: the replica answers other calls meanwhile, and the prompt
    is then refused as too long."""
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data")
    try:
        text = "the quick brown fox jumps over the lazy dog " * 43000
        big = asyncio.ensure_future(stub(policy.channel).Generate(
            policy_pb2.GenerateRequest(prompts=[text_prompt(text)]), timeout=120))
        servicer = policy.app.servicer
        await _policy_until(lambda: servicer.admission.pending == 1, "the big prompt admitted")
        info = await stub(policy.channel).GetInfo(policy_pb2.PolicyServiceGetInfoRequest(),
                                                  timeout=60)
        assert info.server.ready and not big.done()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await big
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the context is 512 tokens" in err.value.details()
    finally:
        await stop_fake_policy(policy)


# ---------------------------------------------------------------------- 24.6 merged switches


async def test_a_pinned_request_cannot_block_a_merged_switch(tiny_model_dir, tiny_adapters,
                                                            tmp_path):
    """24.6: a user pins policy@v1 with a request that runs for minutes on a merged replica;
    the push of v2 waits switch_timeout_seconds, aborts the pinned request with ABORTED saying
    why, and completes (it used to wait for the pinned request and time out)."""
    engine = FakeEngine(vocab_size=512, max_model_len=4096, token_delay=0.05)
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data", mode="merged",
                                     engine=engine, max_model_len=4096,
                                     switch_timeout_seconds=0.5)
    try:
        await _policy_push(policy, tiny_adapters[0], "pin", 1)
        req = policy_pb2.GenerateStreamRequest(prompt=ids_prompt([7, 8]), params=greedy(4000),
                                               adapter=pinned("pin", 1))
        holder = stub(policy.channel).GenerateStream(req, timeout=600)
        await holder.read()
        await holder.read()  # tokens are flowing on v1

        pushed = await _policy_push(policy, tiny_adapters[1], "pin", 2)
        assert pushed.activated and pushed.adapter.adapter.version == 2
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await holder.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "pin@v1" in err.value.details() and "switch_timeout_seconds" in err.value.details()
        assert (await generate_greedy(policy, 4))[1] == ("pin", 2)
        # Rollback works the same way and nothing is left pinned.
        await stub(policy.channel).SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(
            adapter=policy_pb2.AdapterRef(name="pin", version=1)), metadata=AUTH, timeout=60)
        assert (await generate_greedy(policy, 4))[1] == ("pin", 1)
    finally:
        await stop_fake_policy(policy)


# ---------------------------------------------------------------------- 24.7 pushed values


def _policy_tensors(folder: Path, out: Path, change) -> Path:
    from safetensors.torch import load_file

    out.mkdir()
    shutil.copy(folder / "adapter_config.json", out / "adapter_config.json")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def _policy_config(folder: Path, out: Path, text: str | None = None, **changes) -> Path:
    out.mkdir()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (out / "adapter_config.json").write_text(text or json.dumps(cfg))
    shutil.copy(folder / "adapter_model.safetensors", out / "adapter_model.safetensors")
    return out


def _nan_alpha(folder: Path) -> str:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float("nan")
    return json.dumps(cfg)  # writes NaN, which Python's json reads back


BAD_VALUES = {
    "nan tensor": (lambda f, o: _policy_tensors(f, o, lambda t: t.fill_(float("nan"))),
                   "NaN or infinite"),
    "inf tensor": (lambda f, o: _policy_tensors(f, o, lambda t: t.fill_(float("inf"))),
                   "NaN or infinite"),
    "huge tensor": (lambda f, o: _policy_tensors(f, o, lambda t: t.fill_(1e30)),
                    "max_adapter_abs_value"),
    "nan lora_alpha": (lambda f, o: _policy_config(f, o, text=_nan_alpha(f)),
                       "not a number JSON allows"),
    "huge lora_alpha": (lambda f, o: _policy_config(f, o, lora_alpha=1e30), "max_lora_alpha"),
    "negative alpha_pattern": (
        lambda f, o: _policy_config(f, o, alpha_pattern={"q_proj": -5.0}), "alpha_pattern"),
    "regex alpha_pattern key": (
        lambda f, o: _policy_config(f, o, alpha_pattern={"(a+)+$": 4.0}), "not a pattern"),
    "regex target_modules": (
        # Matches the base's q/k projections, so only the refusal of patterns stops it.
        lambda f, o: _policy_config(f, o, target_modules=r".*\.(q|k)_proj"),
        "not a regular expression"),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
async def test_pushed_values_are_checked(policy_replica, tiny_adapters, tmp_path, case):
    """24.7: an adapter whose tensors hold NaN, inf or absurd magnitudes, whose lora_alpha or
    alpha_pattern is not a finite number in bounds, or whose target modules are a regular
    expression, is refused with INVALID_ARGUMENT naming the problem; nothing is kept."""
    make, words = BAD_VALUES[case]
    folder = make(tiny_adapters[0], tmp_path / "bad")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _policy_push(policy_replica, folder, "values", 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert words in err.value.details()
    assert _policy_listed(policy_replica) == []
    assert policy_replica.engine.added == []


# ---------------------------------------------------------------------- 24.9 / 24.11 restore


def _policy_install(root: Path, folder: Path, name: str, version: int, base_model_id: str):
    """An adapter version on disk as a replica of `base_model_id` would have left it."""
    dest = root / name / f"v{version}"
    shutil.copytree(folder, dest)
    data = (dest / "adapter_model.safetensors").read_bytes()
    cfg = json.loads((dest / "adapter_config.json").read_text())
    (dest / META).write_text(json.dumps({
        "name": name, "version": version, "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data), "rank": cfg["r"], "target_modules": cfg["target_modules"],
        "base_model_id": base_model_id, "loaded_at": 0,
    }))
    return dest


def _policy_state(root: Path, active: tuple[str, int] | None, newest: dict) -> None:
    (root / "state.json").write_text(json.dumps({
        "active": {"name": active[0], "version": active[1]} if active else None,
        "newest": newest,
    }))


async def test_a_corrupt_state_file_is_moved_aside_and_the_replica_serves_base(
        tiny_model_dir, tiny_adapters, tmp_path, caplog):
    """24.9: a state.json torn by a crash (or garbled) no longer fails every start-up: it is
    moved aside as state.json.corrupt-<time>, an error is logged, the replica serves the base
    model, and pushes work again."""
    root = tmp_path / "data" / "policy" / "adapters"
    root.mkdir(parents=True)
    (root / "state.json").write_text('{"active": {"name": "m", "vers')
    caplog.set_level(logging.ERROR, "rlhf.policy.adapters")
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data")
    try:
        assert (await generate_greedy(policy, 3))[1] is None
        assert [p.name.startswith("state.json.corrupt-") for p in root.glob("state.json.*")] == [
            True]
        assert any("state.json" in r.getMessage() and "damaged" in r.getMessage()
                   for r in caplog.records)
        assert (await _policy_push(policy, tiny_adapters[0], "m", 1)).activated
    finally:
        await stop_fake_policy(policy)


async def test_a_partial_adapter_folder_is_not_restored(tiny_model_dir, tiny_adapters, tmp_path):
    """24.9/24.11: an adapter folder whose weights file was cut short is not handed to the
    engine at start-up; the replica starts on what is intact (the other version, active)."""
    root = tmp_path / "data" / "policy" / "adapters"
    _policy_install(root, tiny_adapters[0], "cut", 1, "tiny")
    torn = _policy_install(root, tiny_adapters[1], "cut", 2, "tiny")
    weights = torn / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    _policy_state(root, ("cut", 1), {"cut": 2})
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data")
    try:
        assert _policy_listed(policy) == [("cut", 1, True)]
        assert policy.engine.loaded() == {"cut@v1"}
        assert (await generate_greedy(policy, 3))[1] == ("cut", 1)
    finally:
        await stop_fake_policy(policy)


async def test_adapters_made_for_another_base_are_left_aside_at_start_up(
        tiny_model_dir, tiny_adapters, tmp_path, caplog):
    """24.11: a data dir holds adapters a replica of another base (SmolLM2) left, one of them
    active; a replica of the tiny model restores only its own, logs each foreign one by name,
    serves its base, and numbers new versions after the foreign ones."""
    root = tmp_path / "data" / "policy" / "adapters"
    _policy_install(root, tiny_adapters[0], "policy", 1, "smollm2-135m-instruct")
    _policy_install(root, tiny_adapters[1], "policy", 2, "smollm2-135m-instruct")
    _policy_install(root, tiny_adapters[2], "mine", 1, "tiny")
    _policy_state(root, ("policy", 2), {"policy": 2, "mine": 1})
    caplog.set_level(logging.WARNING, "rlhf.policy.adapters")
    policy = await start_fake_policy(tiny_model_dir, tmp_path / "data")
    try:
        assert _policy_listed(policy) == [("mine", 1, False)]
        assert policy.engine.loaded() == {"mine@v1"}
        assert (await generate_greedy(policy, 3))[1] is None
        logged = " ".join(r.getMessage() for r in caplog.records)
        assert "policy@v1" in logged and "policy@v2" in logged and "smollm2" in logged
        assert (root / "policy" / "v2").is_dir()  # left for a replica of its own base
        pushed = await _policy_push(policy, tiny_adapters[3], "policy", 0)
        assert pushed.adapter.adapter.version == 3
    finally:
        await stop_fake_policy(policy)


def _policy_wrong_shapes(folder: Path, out: Path) -> Path:
    """An adapter for a model with another hidden size (100 inputs where the tiny model's
    modules take 256), as another model sharing the folder name would have made."""
    out.mkdir()
    shutil.copy(folder / "adapter_config.json", out / "adapter_config.json")
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(8, 100)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(100, 8)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_replica_starts_beside_an_adapter_that_does_not_fit_its_base(
        tiny_model_dir, tiny_adapters, tmp_path, vllm_cpu_env, caplog):
    """24.11: a real vLLM replica of the tiny model starts over a data dir whose active
    adapter was made for a model of another hidden size under the same base id (vLLM's add_lora
    used to kill start-up with a size mismatch); it serves the base model, keeps its own
    adapter, and names the one it left out."""
    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig

    root = tmp_path / "data" / "policy" / "adapters"
    _policy_install(root, _policy_wrong_shapes(tiny_adapters[0], tmp_path / "other"), "policy",
                    1, "tiny")
    _policy_install(root, tiny_adapters[1], "mine", 1, "tiny")
    _policy_state(root, ("policy", 1), {"policy": 1, "mine": 1})
    caplog.set_level(logging.WARNING, "rlhf.policy.adapters")
    cfg = PolicyConfig.load(grpc_port=0, metrics_port=0, model=tiny_model_dir,
                            data_dir=tmp_path / "data", max_model_len=512, admin_token=ADMIN,
                            max_num_seqs=8, default_max_tokens=8, drain_grace_seconds=1)
    server = await GrpcServer(cfg, PolicyApp(cfg)).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        listed = await stub(channel).ListAdapters(policy_pb2.ListAdaptersRequest(), timeout=30)
        assert [(a.adapter.name, a.adapter.version) for a in listed.adapters] == [("mine", 1)]
        assert not listed.HasField("active") or not listed.active.HasField("adapter")
        resp = await stub(channel).Generate(policy_pb2.GenerateRequest(
            prompts=[ids_prompt([20, 21, 22])], params=greedy(4)), timeout=120)
        assert len(resp.results[0].completions[0].token_ids) == 4
        assert any("policy@v1" in r.getMessage() and "does not fit" in r.getMessage()
                   for r in caplog.records)
    finally:
        await channel.close()
        await server.shutdown()


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_merged_switch_aborts_a_pinned_request_that_holds_it(
        tiny_model_dir, tiny_adapters, tmp_path, vllm_cpu_env):
    """24.6 on the real merged engine: a long request pinned to v1 is running when v2 is pushed;
    the switch waits switch_timeout_seconds, aborts it with ABORTED, merges v2 and the push
    completes."""
    from rlhf.clients.push import push_adapter
    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig

    cfg = PolicyConfig.load(grpc_port=0, metrics_port=0, model=tiny_model_dir,
                            data_dir=tmp_path / "data", max_model_len=512, admin_token=ADMIN,
                            adapter_mode="merged", max_num_seqs=32, default_max_tokens=8,
                            drain_grace_seconds=1, switch_timeout_seconds=0.2)
    server = await GrpcServer(cfg, PolicyApp(cfg)).start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        await push_adapter(channel, tiny_adapters[0], "real", 1, "tiny", token=ADMIN)
        req = policy_pb2.GenerateStreamRequest(
            prompt=ids_prompt([20, 21, 22]), adapter=pinned("real", 1),
            params=policy_pb2.SamplingParams(n=16, max_tokens=500, ignore_eos=True))
        holder = stub(channel).GenerateStream(req, timeout=600)
        await holder.read()
        await holder.read()  # generating on v1
        pushed = await push_adapter(channel, tiny_adapters[1], "real", 2, "tiny", token=ADMIN)
        assert pushed.activated
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while await holder.read() is not grpc.aio.EOF:
                pass
        assert err.value.code() == grpc.StatusCode.ABORTED
        assert "real@v1" in err.value.details()
        resp = await stub(channel).Generate(policy_pb2.GenerateRequest(
            prompts=[ids_prompt([20, 21, 22])], params=greedy(4)), timeout=120)
        assert resp.results[0].served_by.adapter.version == 2
    finally:
        await channel.close()
        await server.shutdown()

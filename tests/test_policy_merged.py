"""merged adapter mode on a real policy server: the active adapter is merged into the weights in
place; same push/rollback semantics; other versions and the base model are refused clearly."""

from __future__ import annotations

import grpc
import pytest

from rlhf.adapter_push import push_adapter
from rlhf.v1 import policy_pb2
from tests.policy_helpers import (
    ADMIN,
    base,
    generate_greedy,
    hf_greedy,
    pinned,
    run_hot_swap,
    set_active,
    stub,
)

pytestmark = pytest.mark.vllm
PROMPT = [20, 21, 22, 23, 24]


@pytest.fixture
def policy(policy_merged):
    return policy_merged


_set_active = set_active


async def test_merged_outputs_equal_hf_peft_and_rollback_restores(policy, tiny_adapters):
    info = await stub(policy.channel).GetInfo(policy_pb2.PolicyServiceGetInfoRequest())
    assert info.adapter_mode == policy_pb2.ADAPTER_MODE_MERGED
    base_ref = hf_greedy(policy.model_dir, None, PROMPT, 10)
    assert (await generate_greedy(policy, 10)) == (base_ref, None)

    await push_adapter(policy.channel, tiny_adapters[0], "m", 1, "tiny", token=ADMIN)
    tokens, served = await generate_greedy(policy, 10)
    assert served == ("m", 1)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, 10)

    await push_adapter(policy.channel, tiny_adapters[1], "m", 2, "tiny", token=ADMIN)
    tokens, served = await generate_greedy(policy, 10)
    assert served == ("m", 2)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[1], PROMPT, 10)

    # Pinning the active version is fine; anything else is a clear FAILED_PRECONDITION.
    assert (await generate_greedy(policy, 10, pinned("m", 2)))[1] == ("m", 2)
    for selector in (base(), pinned("m", 1)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate_greedy(policy, 4, selector)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "merged adapter mode" in err.value.details()

    await _set_active(policy, "m", 1)  # rollback: v2's merge is undone, v1's applied
    tokens, served = await generate_greedy(policy, 10)
    assert served == ("m", 1)
    assert tokens == hf_greedy(policy.model_dir, tiny_adapters[0], PROMPT, 10)

    await _set_active(policy, None)  # back to the exact base weights
    assert (await generate_greedy(policy, 10)) == (base_ref, None)


async def test_merged_hot_swap_under_load(policy, tiny_adapters):
    await _set_active(policy, None)
    await run_hot_swap(policy, tiny_adapters, "mswap")

"""Model ids the gateway accepts and reports: `base` (no adapter), `policy` (the adapter the
policy replica has active), `policy@vN` (a pinned version of the configured adapter name), and
`NAME@vN` for any other adapter name."""

from __future__ import annotations

import re

from gateway.errors import APIError
from rlhf.v1 import policy_pb2

_PINNED = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,127})@v?(?P<version>[0-9]{1,18})$")


def selector_for(model: str, adapter_name: str) -> policy_pb2.AdapterSelector:
    if model == "base":
        return policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_BASE)
    if model == "policy":
        return policy_pb2.AdapterSelector(target=policy_pb2.ADAPTER_TARGET_ACTIVE)
    match = _PINNED.match(model)
    if match is None or int(match["version"]) < 1:
        raise APIError(404, f"model {model!r} does not exist; use 'base', 'policy' or "
                            "'policy@vN' (GET /v1/models lists them)", "model_not_found", "model")
    name = adapter_name if match["name"] == "policy" else match["name"]
    return policy_pb2.AdapterSelector(
        target=policy_pb2.ADAPTER_TARGET_PINNED,
        pinned=policy_pb2.AdapterRef(name=name, version=int(match["version"])))


def model_id(name: str, version: int, adapter_name: str) -> str:
    return f"{'policy' if name == adapter_name else name}@v{version}"


def served_id(served: policy_pb2.ServedBy, adapter_name: str) -> str:
    if served.base or not served.adapter.name:
        return "base"
    return model_id(served.adapter.name, served.adapter.version, adapter_name)


def answered_by(result: policy_pb2.PromptResult) -> policy_pb2.ServedBy:
    """The version that produced the end of an answer: `finished_by` when a merged-mode switch
    landed during the call (a call that reached the engine during the switch has every token
    from it), else `served_by`."""
    return result.finished_by if result.HasField("finished_by") else result.served_by

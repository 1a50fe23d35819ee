"""Which model a request runs on, as the contract spells it: `AdapterSelector` in (the active
version, the base model, or a pinned name@version) and `ServedBy` out."""

from __future__ import annotations

from dataclasses import dataclass

from rlhf.plumbing.errors import InvalidArgument
from rlhf.v1 import policy_pb2
from services.policy.adapters.registry import Key, check_name


@dataclass(frozen=True)
class Target:
    kind: str  # "active" | "base" | "pinned"
    pinned: Key | None = None


def parse_selector(sel: policy_pb2.AdapterSelector) -> Target:
    """An unset target means the active version."""
    if sel.target == policy_pb2.ADAPTER_TARGET_BASE:
        return Target("base")
    if sel.target == policy_pb2.ADAPTER_TARGET_PINNED:
        check_name(sel.pinned.name)
        if sel.pinned.version < 1:
            raise InvalidArgument("adapter.pinned.version must be >= 1")
        return Target("pinned", (sel.pinned.name, sel.pinned.version))
    return Target("active")


def served_by(key: Key | None, sha256: str = "") -> policy_pb2.ServedBy:
    """key None = the base model; sha256: the version's digest, as the replica checked it."""
    if key is None:
        return policy_pb2.ServedBy(base=True)
    return policy_pb2.ServedBy(adapter=policy_pb2.AdapterRef(name=key[0], version=key[1]),
                               sha256=sha256)

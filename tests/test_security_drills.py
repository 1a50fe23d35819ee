"""The security drills (docs/security.md): each one an attack or a fault, with the refusal a user
relies on. They are written by area in tests/security/ (trainer control plane, policy and
servers, TLS and durable state) and run from here, once: the area modules carry no `test_`
prefix, so pytest collects their tests only through this file.

`pytest tests/test_security_drills.py` runs every drill; `-k` picks one by name.
"""

from __future__ import annotations

from _pytest.fixtures import FixtureFunctionDefinition

from tests.security import (
    drills_budgets,
    drills_canary,
    drills_gates,
    drills_gateway,
    drills_loop,
    drills_policy,
    drills_promotion,
    drills_reward,
    drills_tls,
    drills_tracking,
    drills_trainer,
)

AREAS = (drills_trainer, drills_policy, drills_tls, drills_tracking, drills_loop, drills_reward,
         drills_gateway, drills_budgets, drills_promotion, drills_gates, drills_canary)


def _collect() -> dict[str, object]:
    """The tests and fixtures of every area, refusing two with one name (the second would hide
    the first from pytest without a word)."""
    found: dict[str, object] = {}
    for area in AREAS:
        for name, obj in vars(area).items():
            is_test = name.startswith("test_") and callable(obj)
            if not (is_test or isinstance(obj, FixtureFunctionDefinition)):
                continue
            owner = getattr(obj, "__module__", area.__name__)
            if owner != area.__name__:
                continue  # a fixture an area imports from the shared fixtures
            if name in found:
                raise RuntimeError(f"two security drills or fixtures are named {name!r}")
            found[name] = obj
    return found


globals().update(_collect())

"""Adapter versions on a policy replica.

- registry.py: what both modes share: the kept versions, the active one, leases, retirement,
  state.json;
- lora.py / merged.py: one registry class per adapter mode (how versions are served, what a
  push or a switch does to requests);
- store.py: PushAdapter's workflow (lock, receive, checks, install, clean-up);
- checks.py: what a pushed adapter must satisfy.
"""

from __future__ import annotations

from pathlib import Path

from services.policy.adapters.lora import LoraAdapters
from services.policy.adapters.merged import MergedAdapters
from services.policy.adapters.registry import AdapterRegistry
from services.policy.engine import Engine
from services.policy.stats import EngineStats


def make_registry(mode: str, root: Path, engine: Engine, keep_versions: int, max_loaded: int,
                  stats: EngineStats, switch_timeout: float = 30.0) -> AdapterRegistry:
    """The registry of an adapter mode ("lora" or "merged")."""
    if mode == "lora":
        return LoraAdapters(root, engine, keep_versions, stats, max_loaded=max_loaded)
    if mode == "merged":
        return MergedAdapters(root, engine, keep_versions, stats, switch_timeout=switch_timeout)
    raise ValueError(f"unknown adapter mode {mode!r}")

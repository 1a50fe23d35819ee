"""vLLM stays in services/policy/vllm_backend/: no other module of the policy imports it, so the
servicer, the adapter registry and the fake engine run (and are tested) without it."""

from __future__ import annotations

import ast
from pathlib import Path

POLICY = Path(__file__).resolve().parents[2] / "services" / "policy"
BACKEND = POLICY / "vllm_backend"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_vllm_backend_imports_vllm():
    outside = [p for p in POLICY.rglob("*.py") if BACKEND not in p.parents]
    assert len(outside) > 5
    offenders = {str(p.relative_to(POLICY)): sorted(n for n in _imports(p)
                                                    if n == "vllm" or n.startswith("vllm."))
                 for p in outside}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any("vllm" in n for p in BACKEND.rglob("*.py") for n in _imports(p))

"""The architecture's boundaries: services never import each other; plumbing has no domain code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["services.policy", "services.reward", "services.trainer", "gateway"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("part", PARTS)
def test_services_do_not_import_each_other(part):
    folder = ROOT / part.replace(".", "/")
    others = [p for p in PARTS if p != part]
    files = list(folder.rglob("*.py"))
    assert files
    for path in files:
        for name in _imports(path):
            assert not any(name == o or name.startswith(o + ".") for o in others), (
                f"{path.relative_to(ROOT)} imports {name}"
            )


def test_plumbing_imports_no_service_or_model_code():
    for path in (ROOT / "rlhf" / "plumbing").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("services", "gateway", "torch", "vllm", "transformers")), (
                f"{path.relative_to(ROOT)} imports {name}"
            )

"""The architecture's boundaries (DESIGN.md): services never import each other; they share only
the generated protobuf code, the plumbing and the contract helpers; plumbing and the contract
helpers hold no service code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ["services.policy", "services.reward", "services.trainer", "gateway"]
# What a service may import from the `rlhf` package: the wire contract, the plumbing and the
# contract helpers. The CLI, the stack and the model tools sit above the services.
SHARED = ("rlhf.v1", "rlhf.plumbing", "rlhf.clients", "rlhf.formats", "rlhf.paths", "rlhf.files")
CONTRACT_HELPERS = ["rlhf/plumbing", "rlhf/clients", "rlhf/formats.py", "rlhf/paths.py",
                    "rlhf/files.py"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def _files(rel: str) -> list[Path]:
    path = ROOT / rel
    return [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("part", PARTS)
def test_services_do_not_import_each_other(part):
    others = [p for p in PARTS if p != part]
    files = _files(part.replace(".", "/"))
    assert files
    for path in files:
        for name in _imports(path):
            assert not any(_under(name, o) for o in others), (
                f"{path.relative_to(ROOT)} imports {name}")


@pytest.mark.parametrize("part", PARTS)
def test_services_share_only_contract_plumbing_and_helpers(part):
    for path in _files(part.replace(".", "/")):
        for name in _imports(path):
            if not _under(name, "rlhf") or name in ("rlhf", "rlhf.__version__"):
                continue
            assert any(_under(name, s) for s in SHARED), (
                f"{path.relative_to(ROOT)} imports {name}: a service may use only "
                f"{', '.join(SHARED)} from rlhf/")


@pytest.mark.parametrize("rel", CONTRACT_HELPERS)
def test_shared_code_imports_no_service_or_model_code(rel):
    files = _files(rel)
    assert files, rel
    for path in files:
        for name in _imports(path):
            assert not any(_under(name, banned) for banned in (
                "services", "gateway", "torch", "vllm", "transformers", "rlhf.stack", "rlhf.cli",
                "rlhf.models")), f"{path.relative_to(ROOT)} imports {name}"


def test_only_the_policy_vllm_backend_imports_vllm():
    """The policy's servicer, adapter registry and fake engine run (and are tested) without
    vLLM: only services/policy/vllm_backend/ imports it."""
    policy = ROOT / "services" / "policy"
    backend = policy / "vllm_backend"
    outside = [p for p in policy.rglob("*.py") if backend not in p.parents]
    assert len(outside) > 5
    offenders = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if _under(n, "vllm"))
                 for p in outside}
    assert {k: v for k, v in offenders.items() if v} == {}
    assert any(_under(n, "vllm") for p in backend.rglob("*.py") for n in _imports(p))

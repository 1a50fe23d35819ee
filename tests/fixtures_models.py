"""Shared fixtures for anything that needs a model: a tiny random Llama and a vLLM CPU setup.

Import with `from tests.fixtures_models import *` (conftest does). The hub is switched off here,
at import, because huggingface_hub reads HF_HUB_OFFLINE once when it is first imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

__all__ = ["tiny_model_dir", "vllm_cpu_env"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama folder (seed 0), built once per test session."""
    from rlhf.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def vllm_cpu_env(tmp_path_factory: pytest.TempPathFactory):
    """Environment for an in-process vLLM engine on CPU (DESIGN.md decision 2); request it
    before importing vllm.

    Values already set (by conftest or the caller) win, so every engine in a session shares one
    VLLM_CACHE_ROOT: vLLM caches its env once an engine starts, and the model inspection it
    stores there costs ~13 s per fresh cache dir.
    """
    base = tmp_path_factory.mktemp("vllm")
    defaults = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_RPC_BASE_PATH": str(base / "rpc"),
        "VLLM_CACHE_ROOT": str(base / "cache"),
    }
    mp = pytest.MonkeyPatch()
    for key, value in defaults.items():
        if key not in os.environ:
            mp.setenv(key, value)
    for key in ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT"):
        Path(os.environ[key]).mkdir(parents=True, exist_ok=True)
    yield {key: os.environ[key] for key in defaults}
    mp.undo()

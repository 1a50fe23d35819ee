"""Shared test set-up: offline hub, small vLLM settings, free ports, helpers to run services."""

from __future__ import annotations

import os
import tempfile

# Before anything imports transformers or vLLM: nothing may reach a model hub, and vLLM on CPU
# needs its KV cache size and private temp dirs (DESIGN.md decision 2).
_TMP = tempfile.mkdtemp(prefix="rlhf-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_RPC_BASE_PATH", os.path.join(_TMP, "vllm-rpc"))
os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(_TMP, "vllm-cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _var in ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT"):
    os.makedirs(os.environ[_var], exist_ok=True)

import pytest  # noqa: E402

from tests.fixtures.models import *  # noqa: E402,F401,F403
from tests.fixtures.policy import *  # noqa: E402,F401,F403
from tests.fixtures.ports import free_port  # noqa: E402
from tests.fixtures.postgres import *  # noqa: E402,F401,F403
from tests.fixtures.reward import *  # noqa: E402,F401,F403


@pytest.fixture
def port_factory():
    return free_port

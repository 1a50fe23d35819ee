"""Shared set-up for the benchmarks: environment, a policy server on the default model, the
standard workload, a random LoRA adapter, and the report format (ratios, then one JSON line)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

_TMP = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_RPC_BASE_PATH", str(_TMP / "rpc"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(Path.home() / ".cache" / "rlhf-grpc" / "vllm-cache"))
for _var in ("VLLM_RPC_BASE_PATH", "VLLM_CACHE_ROOT"):
    os.makedirs(os.environ[_var], exist_ok=True)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

QUESTIONS = [
    "What is the capital of France?", "Give me a tip for learning to cook.",
    "Why is the sky blue?", "Write a haiku about autumn.", "How do magnets work?",
    "What should I pack for a beach holiday?", "Explain photosynthesis simply.",
    "Name three famous painters.", "How can I sleep better?", "What is a prime number?",
    "Describe a cat to someone who has never seen one.", "What makes a good friend?",
    "How do airplanes fly?", "Suggest a name for a bakery.", "What is gravity?",
    "How do I start running?", "Tell me a fun fact about octopuses.",
    "What is the water cycle?", "How do vaccines work?", "What is a black hole?",
    "Give me a recipe idea with eggs.", "Why do leaves change colour?",
    "What is the tallest mountain?", "How do bees make honey?", "What is democracy?",
    "How can I save money?", "What is an atom?", "Why do we dream?",
    "What is the speed of light?", "How do I write a good email?",
    "What is machine learning?", "Why is exercise healthy?",
]


def default_model() -> Path:
    from rlhf.paths import default_model_dir

    path = default_model_dir()
    if not (path / "config.json").exists():
        raise SystemExit(f"default model missing at {path}: run `rlhf model prepare` first")
    return path


def chat_prompts(n: int = 32):
    from rlhf.v1 import common_pb2

    return [
        common_pb2.Prompt(chat=common_pb2.ChatConversation(
            messages=[common_pb2.ChatMessage(role="user", content=q)]))
        for q in (QUESTIONS * (n // len(QUESTIONS) + 1))[:n]
    ]


# Benchmark mode names -> (adapter_mode, config overrides).
POLICY_MODES = {
    "lora": ("lora", {}),
    "lora-vllm-ops": ("lora", {"cpu_lora_ops": "vllm"}),
    "merged": ("merged", {}),
}


async def start_policy(mode: str = "lora", dtype: str = "bfloat16", **overrides):
    """An in-process policy server on the default model; returns (server, channel)."""
    import grpc

    from rlhf.plumbing.server import GrpcServer
    from services.policy.app import PolicyApp
    from services.policy.config import PolicyConfig

    cfg = PolicyConfig.load(
        grpc_port=0, metrics_port=0, model=default_model(),
        data_dir=Path(tempfile.mkdtemp(prefix=f"data-{mode}-", dir=_TMP)),
        dtype=dtype, adapter_mode=mode, max_model_len=1024, kv_cache_gib=2.0, max_num_seqs=128,
        max_pending_sequences=4096, insecure_no_auth=True, **overrides,
    )
    server = await GrpcServer(cfg, PolicyApp(cfg)).start()
    return server, grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")


def make_adapter(out: Path, r: int = 16, seed: int = 0,
                 targets=("q_proj", "k_proj", "v_proj", "o_proj")) -> Path:
    """A random r=16 LoRA adapter of the default model (small random B: realistic magnitudes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(default_model(), dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                                            lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft.save_pretrained(out)
    return out


def percentile(values, q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def report(name: str, figures: dict) -> None:
    """Human lines first, then exactly one JSON line (the last line of output)."""
    figures = {"bench": name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **figures}
    print(json.dumps(figures, sort_keys=False), flush=True)

"""Policy metrics: what is measured (plain counters the servicer and engine update) turned into
Prometheus series `rlhf_policy_*` (vLLM's scheduler figures come in through
vllm_backend/stat_logger.py). Labels stay bounded: method/code from the interceptor, adapter
name (a handful per deployment) and result."""

from __future__ import annotations

from rlhf.plumbing import metrics as m


class EngineStats:
    def __init__(self) -> None:
        self.prompt_tokens = m.counter(
            "rlhf_policy_prompt_tokens", "Prompt tokens admitted (each prompt once, whatever n)"
        )
        self.generated_tokens = m.counter(
            "rlhf_policy_generated_tokens", "Tokens generated over all completions"
        )
        self.running = m.gauge("rlhf_policy_requests_running", "Sequences vLLM is running")
        self.waiting = m.gauge("rlhf_policy_requests_waiting", "Sequences waiting in vLLM")
        self.pending = m.gauge(
            "rlhf_policy_pending_sequences", "Sequences admitted and not finished (admission bound)"
        )
        self.rejected = m.counter(
            "rlhf_policy_admission_rejected", "Calls refused with RESOURCE_EXHAUSTED"
        )
        self.kv_cache_usage = m.gauge("rlhf_policy_kv_cache_usage_ratio", "KV cache in use, 0..1")
        self.active_version = m.gauge(
            "rlhf_policy_active_adapter_version",
            "Version of the active adapter (0 = base model)", ("adapter",),
        )
        self.adapter_loads = m.counter(
            "rlhf_policy_adapter_loads", "Adapter pushes by result", ("result",)
        )
        self.adapter_load_seconds = m.histogram(
            "rlhf_policy_adapter_load_seconds", "Upload end to servable, per adapter push",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.pushed_bytes = m.counter("rlhf_policy_adapter_pushed_bytes", "Adapter bytes received")
        self.staged_adapters = m.gauge(
            "rlhf_policy_staged_adapters", "Adapter versions staged and not committed yet"
        )
        self.staged_dropped = m.counter(
            "rlhf_policy_staged_dropped", "Staged adapter versions dropped, by reason (drop: "
            "DropAdapter; timeout: not committed by the deadline)", ("reason",)
        )
        self.loaded_adapters = m.gauge(
            "rlhf_policy_loaded_adapters", "Adapter versions loaded in the engine"
        )


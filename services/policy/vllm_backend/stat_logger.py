"""A vLLM stat logger that copies scheduler figures into the policy's gauges (stats.py)."""

from __future__ import annotations

from services.policy.stats import EngineStats


def make_stat_logger_factory(stats: EngineStats):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _Logger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            if scheduler_stats is not None:
                stats.running.set(scheduler_stats.num_running_reqs)
                stats.waiting.set(scheduler_stats.num_waiting_reqs)
                stats.kv_cache_usage.set(scheduler_stats.kv_cache_usage)

        def log_engine_initialized(self):
            pass

    return _Logger

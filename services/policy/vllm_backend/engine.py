"""The Engine on vLLM's AsyncLLM, in the same process as the gRPC server (DESIGN.md decision 1).

`async with VllmEngine(config, stats):` starts AsyncLLM (and, in lora mode on CPU, swaps in the
grouped LoRA ops) and shuts it down on the way out, whatever happened inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from rlhf.plumbing.cpus import parse_cpu_list, pin_process
from rlhf.plumbing.errors import InvalidArgument
from services.policy.config import PolicyConfig
from services.policy.engine import (
    AdapterHandle,
    CompletionDelta,
    EngineDead,
    EngineOutput,
    Sampling,
)
from services.policy.stats import EngineStats

log = logging.getLogger("rlhf.policy.engine")


def _engine_env(config: PolicyConfig) -> None:
    """vLLM reads these at import; only fill what the operator left unset."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.kv_cache_gib))))
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if config.cpu_cores:
        # vLLM binds threads itself only with its multiprocess executor, which we don't use:
        # confine this process before the engine core starts, and the core inherits the cores
        # (Linux affinity) and a thread count to match (OMP_NUM_THREADS, read when it imports
        # torch).
        import torch

        cores = parse_cpu_list(config.cpu_cores)
        pin_process(cores)
        torch.set_num_threads(len(cores))
        os.environ["OMP_NUM_THREADS"] = str(len(cores))


class VllmEngine:
    def __init__(self, config: PolicyConfig, stats: EngineStats):
        self.config = config
        self.stats = stats
        self.llm = None
        self.max_model_len = config.max_model_len
        self.vocab_size = 0
        self.dtype = config.dtype
        self.version = "vllm"
        self._merged_lock = asyncio.Lock()
        self._pauses = 0  # paused() blocks open

    async def __aenter__(self) -> VllmEngine:
        _engine_env(self.config)
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from services.policy.vllm_backend.stat_logger import make_stat_logger_factory

        cfg = self.config
        lora = cfg.adapter_mode == "lora"
        args = AsyncEngineArgs(
            model=str(cfg.resolved_model()),
            dtype=cfg.dtype,
            max_model_len=cfg.max_model_len,
            max_num_seqs=cfg.max_num_seqs,
            # vLLM 0.32 on CPU crashes its engine ("CPU Generator does not use offset") when a
            # seeded request's prefill is split across steps, and the trainer always seeds: so
            # no chunked prefill, and a step budget that fits a whole prompt.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(cfg.max_num_batched_tokens, cfg.max_model_len),
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30),
            # Logprobs of the sampled tokens before temperature/top-k/top-p, as the trainer
            # recomputes them (DESIGN.md decision 5).
            logprobs_mode="raw_logprobs",
            max_logprobs=20,
            enable_lora=lora,
            max_lora_rank=cfg.max_lora_rank if lora else 16,
            # One slot more than can ever be live: vLLM on CPU gives base requests the last
            # slot's adapter when a batch holds as many distinct adapters as max_loras.
            max_loras=cfg.max_loaded_adapters + 1 if lora else 1,
            max_cpu_loras=cfg.max_loaded_adapters + 1 if lora else None,
            disable_log_stats=False,
        )
        self.llm = AsyncLLM.from_engine_args(
            args, stat_loggers=[make_stat_logger_factory(self.stats)]
        )
        try:
            if lora and cfg.cpu_lora_ops == "grouped":
                import cloudpickle

                from services.policy.vllm_backend import cpu_lora

                # Before the first request; a no-op off CPU (vLLM's own kernels run there).
                await self.llm.collective_rpc(cloudpickle.dumps(cpu_lora.install))
            self.vocab_size = self.llm.model_config.get_vocab_size()
            self.max_model_len = self.llm.model_config.max_model_len
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self.version = f"vllm {vllm.__version__}"
        log.info("%s engine up: %s (%s, context %d)", self.version, cfg.resolved_model(),
                 cfg.dtype, self.max_model_len)
        return self

    async def __aexit__(self, *exc_info) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.shutdown()

    async def check_health(self) -> None:
        if self.llm is None:
            raise EngineDead("the vLLM engine is not running")
        try:
            await self.llm.check_health()
        except Exception as exc:  # noqa: BLE001 - any failure here means it cannot serve
            raise EngineDead(f"the vLLM engine core died: {exc}") from exc

    def pending_requests(self) -> int:
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0

    def _params(self, s: Sampling, stream: bool):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=s.n,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k if s.top_k > 0 else -1,
            min_p=s.min_p,
            stop=list(s.stop) or None,
            stop_token_ids=list(s.stop_token_ids) or None,
            seed=s.seed,
            # The sampled token's logprob always comes back with k alternatives; 0 = only it.
            logprobs=s.top_logprobs if (s.logprobs or s.top_logprobs) else None,
            min_tokens=s.min_tokens,
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            ignore_eos=s.ignore_eos,
            skip_special_tokens=True,
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
        )

    async def generate(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        request_id: str,
        adapter: AdapterHandle | None,
        stream: bool,
        on_submit: Callable[[], None] | None = None,
    ) -> AsyncIterator[EngineOutput]:
        from vllm.inputs import tokens_input
        from vllm.lora.request import LoRARequest
        from vllm.outputs import STREAM_FINISHED
        from vllm.v1.engine.exceptions import EngineDeadError

        if self.llm is None:
            raise EngineDead("the vLLM engine is not running")
        lora = None
        if adapter is not None:
            lora = LoRARequest(adapter.engine_name, adapter.engine_id, str(adapter.path))
        want_lp = sampling.logprobs or sampling.top_logprobs > 0
        queue = None
        try:
            # AsyncLLM.add_request rather than generate(): it returns once the request is on
            # its way to the engine core, which on_submit reports (a push holds the engine
            # paused until the requests it held back are in). A token-ids input skips the
            # renderer's thread pool, a thread hop per request that raw prompts take.
            queue = await self.llm.add_request(
                request_id, tokens_input(prompt_ids), self._params(sampling, stream),
                lora_request=lora,
            )
            if on_submit is not None:
                on_submit()
            finished = False
            while not finished:
                out = queue.get_nowait() or await queue.get()
                finished = out.finished
                if out is STREAM_FINISHED:
                    continue
                yield EngineOutput(
                    completions=[_delta(c, want_lp, sampling) for c in out.outputs],
                    finished=out.finished,
                )
        except (asyncio.CancelledError, GeneratorExit):
            # The caller went away (a cancelled call, an expired deadline): free the engine.
            if queue is not None:
                await self.llm.abort(queue.request_id, internal=True)
            raise
        except EngineDeadError as exc:
            raise EngineDead(f"the vLLM engine core died: {exc}") from exc
        except ValueError as exc:  # vLLM's own request validation
            raise InvalidArgument(str(exc)) from exc
        except Exception:
            if queue is not None:
                await self.llm.abort(queue.request_id, internal=True)
            raise
        finally:
            if queue is not None:
                queue.close()

    async def add_adapter(self, handle: AdapterHandle) -> None:
        from vllm.lora.request import LoRARequest

        ok = await self.llm.add_lora(
            LoRARequest(handle.engine_name, handle.engine_id, str(handle.path))
        )
        if not ok:
            raise InvalidArgument(f"vLLM refused adapter {handle.engine_name}")

    async def remove_adapter(self, handle: AdapterHandle) -> None:
        await self.llm.remove_lora(handle.engine_id)

    @contextlib.asynccontextmanager
    async def paused(self):
        # "keep": requests in the engine stay there; none is aborted. (AsyncLLM's
        # pause_generation would add a 20 ms sleep meant for callers that want the last
        # outputs delivered first; ours go on, so it would be pure delay.) The engine core
        # takes its input in order: whatever is sent after the pause, with or before the
        # answer, waits for the resume.
        self._pauses += 1
        try:
            if self._pauses == 1:
                await self.llm.engine_core.pause_scheduler_async(mode="keep", clear_cache=False)
            yield
        finally:
            self._pauses -= 1
            if self._pauses == 0:
                # Shielded: a cancelled caller must not leave every request stalled.
                await asyncio.shield(self.llm.resume_generation())

    async def load_merged(self, weights_dir: Path | None) -> None:
        import cloudpickle

        from services.policy.vllm_backend.merge import reload_merged

        # The registry has already drained the requests pinned to the old version.
        async with self._merged_lock, self.paused():
            base = str(self.config.resolved_model())
            adapter = str(weights_dir) if weights_dir is not None else None
            # The engine core runs in its own process and its RPC encoder takes no
            # functions; vLLM accepts a cloudpickled callable (by reference: the core
            # imports services.policy.vllm_backend.merge). Only paths go across, never tensors.
            await self.llm.collective_rpc(
                cloudpickle.dumps(reload_merged),
                kwargs={"base_dir": base, "adapter_dir": adapter},
            )
            # Requests still running go on with the new weights from a clean state: vLLM
            # preempts them and recomputes their prompt and tokens so far, and no cached
            # prefix of the old weights survives.
            await self.llm.reset_prefix_cache(reset_running_requests=True)


def _delta(c, want_lp: bool, sampling: Sampling) -> CompletionDelta:
    token_ids = list(c.token_ids)
    logprobs: list[float] = []
    top: list[list[tuple[int, float]]] = []
    if want_lp and c.logprobs:
        for tok, step in zip(token_ids, c.logprobs, strict=False):
            logprobs.append(float(step[tok].logprob))
            if sampling.top_logprobs:
                ranked = sorted(
                    ((tid, lp) for tid, lp in step.items() if lp.rank is not None
                     and lp.rank <= sampling.top_logprobs),
                    key=lambda item: item[1].rank,
                )
                top.append([(tid, float(lp.logprob)) for tid, lp in ranked])
    stop_string = c.stop_reason if isinstance(c.stop_reason, str) else ""
    return CompletionDelta(
        index=c.index,
        text=c.text,
        token_ids=token_ids,
        logprobs=logprobs if sampling.logprobs else [],
        top_logprobs=top,
        finish_reason=c.finish_reason,
        stop_string=stop_string,
    )

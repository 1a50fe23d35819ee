"""PolicyService over gRPC: validates a request, admits it, leases the adapter version it runs
on, runs the engine, and maps the results to the contract. Pushes go to the AdapterStore; admin
auth is an interceptor (app.py). No vLLM types here (see engine.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.plumbing.errors import InvalidArgument
from rlhf.plumbing.info import server_info
from rlhf.plumbing.logs import current_request_id
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.policy.adapters.registry import AdapterRegistry, Kept, Key, Lease, check_name
from services.policy.adapters.store import AdapterStore
from services.policy.admission import Admission
from services.policy.config import PolicyConfig
from services.policy.engine import CompletionDelta, Engine, Sampling
from services.policy.requests import (
    Limits,
    max_tokens_for,
    prompt_token_ids,
    sampling_from_proto,
)
from services.policy.selector import parse_selector, served_by
from services.policy.stats import EngineStats

FINISH = {
    "stop": policy_pb2.FINISH_REASON_STOP,
    "length": policy_pb2.FINISH_REASON_LENGTH,
    "abort": policy_pb2.FINISH_REASON_ABORT,
    None: policy_pb2.FINISH_REASON_UNSPECIFIED,
}


def _top(delta: CompletionDelta) -> list[policy_pb2.TopLogprobs]:
    return [
        policy_pb2.TopLogprobs(token_ids=[t for t, _ in step], logprobs=[lp for _, lp in step])
        for step in delta.top_logprobs
    ]


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def adapter_info(kept: Kept, registry: AdapterRegistry) -> policy_pb2.AdapterInfo:
    until = registry.staged_until(kept.key)
    return policy_pb2.AdapterInfo(
        adapter=policy_pb2.AdapterRef(name=kept.handle.name, version=kept.handle.version),
        sha256=kept.sha256, size_bytes=kept.size_bytes, rank=kept.rank,
        target_modules=kept.target_modules, loaded_at=_timestamp(kept.loaded_at),
        active=kept.key == registry.active, in_flight_requests=kept.in_flight,
        staged=until is not None, staged_until=_timestamp(until) if until is not None else None,
    )


def _version_key(ref: policy_pb2.AdapterRef) -> Key:
    check_name(ref.name)
    if ref.version < 1:
        raise InvalidArgument("adapter.version must be >= 1")
    return (ref.name, ref.version)


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, config: PolicyConfig, engine: Engine, registry: AdapterRegistry,
                 store: AdapterStore, tokenizer, stats: EngineStats, is_ready):
        self.config = config
        self.engine = engine
        self.registry = registry
        self.store = store
        self.tokenizer = tokenizer
        self.stats = stats
        self.is_ready = is_ready
        self.admission = Admission(config.max_pending_sequences, stats)
        self._tokenizing = ThreadPoolExecutor(1, thread_name_prefix="policy-tokenize")

    @property
    def limits(self) -> Limits:
        cfg = self.config
        return Limits(
            max_model_len=self.engine.max_model_len, vocab_size=self.engine.vocab_size,
            max_n=cfg.max_n, max_prompts=cfg.max_prompts_per_request,
            default_max_tokens=cfg.default_max_tokens,
        )

    def _served_by(self, key: Key | None) -> policy_pb2.ServedBy:
        """ServedBy with the digest of the version, so a caller can tell it is what it pushed."""
        kept = self.registry.existing(*key) if key is not None else None
        return served_by(key, kept.sha256 if kept is not None else "")

    # ------------------------------------------------------------------ generation

    async def _complete(self, ids, sampling: Sampling, request_id: str, lease: Lease):
        """The prompt's completions, and the version that finished them when the weights
        changed under them (else None)."""
        final: dict[int, CompletionDelta] = {}
        async for out in self.engine.generate(ids, sampling, request_id, lease.handle,
                                              stream=False, on_submit=lease.submitted):
            for c in out.completions:
                final[c.index] = c
        now, switched = self.registry.finished_by(lease)
        return [final[i] for i in sorted(final)], (self._served_by(now) if switched else None)

    def _tokenize(self, prompts, sampling: Sampling, limits: Limits, single: bool):
        prepared = []
        for i, prompt in enumerate(prompts):
            where = "prompt" if single else f"prompts[{i}]"
            ids = prompt_token_ids(prompt, self.tokenizer, limits, where)
            max_tokens = max_tokens_for(sampling, len(ids), limits, where)
            prepared.append((ids, replace(sampling, max_tokens=max_tokens)))
        return prepared

    async def _prepare(self, prompts, sampling: Sampling, single: bool = False):
        """Each prompt's token ids and sampling. Tokenizing a long text takes a while: it runs
        on the tokenizer's own thread, so the event loop goes on serving other calls."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._tokenizing, self._tokenize, prompts, sampling, self.limits, single)

    def close(self) -> None:
        self._tokenizing.shutdown(wait=False, cancel_futures=True)

    async def Generate(self, request, context):
        if not request.prompts:
            raise InvalidArgument("prompts is empty: send at least one prompt")
        if len(request.prompts) > self.config.max_prompts_per_request:
            raise InvalidArgument(
                f"{len(request.prompts)} prompts; this server takes at most "
                f"{self.config.max_prompts_per_request} per call"
            )
        sampling = sampling_from_proto(request.params, self.limits)
        target = parse_selector(request.adapter)
        rid = current_request_id()
        tag = uuid.uuid4().hex[:8]
        # Admitted before the prompts are tokenized: the bound holds for that work too.
        with self.admission.admit(len(request.prompts) * sampling.n):
            prepared = await self._prepare(request.prompts, sampling)
            async with self.registry.lease(target.kind, target.pinned, len(prepared)) as lease:
                self.stats.prompt_tokens.inc(sum(len(ids) for ids, _ in prepared))
                try:
                    async with asyncio.TaskGroup() as tg:
                        tasks = [
                            tg.create_task(
                                self._complete(ids, s, f"{rid}-{tag}-{i}", lease))
                            for i, (ids, s) in enumerate(prepared)
                        ]
                except ExceptionGroup as group:
                    # One prompt's failure fails the call (its siblings were cancelled); report
                    # the first error itself, so a ServiceError keeps its status code.
                    raise group.exceptions[0] from None
        response = policy_pb2.GenerateResponse(request_id=rid)
        # The digest of the version the lease held (it may be unloaded by now).
        lease_sha = lease.kept.sha256 if lease.kept is not None else ""
        generated = 0
        for i, ((ids, _), task) in enumerate(zip(prepared, tasks, strict=True)):
            completions, finished_by = task.result()
            result = response.results.add(prompt_index=i, prompt_token_ids=ids,
                                          served_by=served_by(lease.served, lease_sha),
                                          finished_by=finished_by)
            for c in completions:
                generated += len(c.token_ids)
                result.completions.append(policy_pb2.Completion(
                    index=c.index, text=c.text, token_ids=c.token_ids, logprobs=c.logprobs,
                    top_logprobs=_top(c), finish_reason=FINISH.get(c.finish_reason),
                    stop_string=c.stop_string,
                ))
        self.stats.generated_tokens.inc(generated)
        response.usage.CopyFrom(common_pb2.Usage(
            prompt_tokens=sum(len(ids) for ids, _ in prepared), completion_tokens=generated
        ))
        return response

    async def GenerateStream(self, request, context):
        if not request.HasField("prompt"):
            raise InvalidArgument("prompt is empty: set text, token_ids or chat")
        sampling = sampling_from_proto(request.params, self.limits)
        target = parse_selector(request.adapter)
        rid = f"{current_request_id()}-{uuid.uuid4().hex[:8]}"
        generated = 0
        with self.admission.admit(sampling.n):
            [(ids, s)] = await self._prepare([request.prompt], sampling, single=True)
            async with self.registry.lease(target.kind, target.pinned) as lease:
                self.stats.prompt_tokens.inc(len(ids))
                yield policy_pb2.GenerateStreamResponse(
                    served_by=served_by(lease.served,
                                        lease.kept.sha256 if lease.kept is not None else ""),
                    prompt_token_ids=ids,
                )
                outputs = self.engine.generate(ids, s, rid, lease.handle, stream=True,
                                               on_submit=lease.submitted)
                # Closed here, also when the call ends early: the engine request ends with it.
                async with contextlib.aclosing(outputs):
                    async for out in outputs:
                        for c in out.completions:
                            if not c.token_ids and c.finish_reason is None:
                                continue
                            generated += len(c.token_ids)
                            yield policy_pb2.GenerateStreamResponse(
                                index=c.index, text_delta=c.text, token_ids=c.token_ids,
                                logprobs=c.logprobs, top_logprobs=_top(c),
                                finish_reason=FINISH.get(c.finish_reason),
                                stop_string=c.stop_string,
                            )
                now, switched = self.registry.finished_by(lease)
        self.stats.generated_tokens.inc(generated)
        yield policy_pb2.GenerateStreamResponse(
            usage=common_pb2.Usage(prompt_tokens=len(ids), completion_tokens=generated),
            finished_by=self._served_by(now) if switched else None,
        )

    # ------------------------------------------------------------------ adapters

    async def PushAdapter(self, request_iterator, context):
        pushed = await self.store.push(request_iterator)
        return policy_pb2.PushAdapterResponse(
            adapter=adapter_info(pushed.kept, self.registry),
            activated=pushed.activated, load_seconds=pushed.load_seconds,
        )

    async def SetActiveAdapter(self, request, context):
        key = None
        if not request.base:
            check_name(request.adapter.name)
            key = (request.adapter.name, request.adapter.version)
        previous, now = await self.registry.set_active(key)
        return policy_pb2.SetActiveAdapterResponse(previous=self._served_by(previous),
                                                   active=self._served_by(now))

    async def DropAdapter(self, request, context):
        key = _version_key(request.adapter)
        staged = self.registry.staged_until(key) is not None
        dropped = await self.registry.drop(key)
        if dropped and staged:
            self.stats.staged_dropped.labels("drop").inc()
        return policy_pb2.DropAdapterResponse(dropped=dropped)

    async def KeepAdapter(self, request, context):
        kept = self.registry.keep(_version_key(request.adapter))
        return policy_pb2.KeepAdapterResponse(adapter=adapter_info(kept, self.registry))

    async def ListAdapters(self, request, context):
        kept = self.registry.kept()
        if request.name:
            kept = [k for k in kept if k.handle.name == request.name]
        return policy_pb2.ListAdaptersResponse(
            adapters=[adapter_info(k, self.registry) for k in kept],
            active=self._served_by(self.registry.active),
            next_version=self.registry.next_version(request.name) if request.name else 0,
        )

    async def GetInfo(self, request, context):
        cfg = self.config
        try:
            await self.engine.check_health()
            healthy = True
        except Exception:  # noqa: BLE001 - reported as not ready; the app's watch logs why
            healthy = False
        return policy_pb2.PolicyServiceGetInfoResponse(
            server=server_info("policy", self.is_ready() and healthy),
            base_model_id=cfg.resolved_base_model_id(),
            base_model_fingerprint=self.store.limits.base_model_fingerprint,
            max_model_len=self.engine.max_model_len,
            max_n=cfg.max_n,
            max_prompts_per_request=cfg.max_prompts_per_request,
            max_lora_rank=cfg.max_lora_rank,
            max_adapter_bytes=cfg.max_adapter_bytes,
            keep_versions=cfg.keep_versions,
            adapter_mode=(policy_pb2.ADAPTER_MODE_MERGED if cfg.adapter_mode == "merged"
                          else policy_pb2.ADAPTER_MODE_LORA),
            active=self._served_by(self.registry.active),
            engine=self.engine.version,
            dtype=self.engine.dtype,
            default_max_tokens=cfg.default_max_tokens,
        )

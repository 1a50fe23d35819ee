"""PolicyService over gRPC: validates, admits, leases an adapter version, runs the engine, and
maps results to the contract. No vLLM types here (see engine.py)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import shutil
import time
import uuid
from dataclasses import replace

from google.protobuf.timestamp_pb2 import Timestamp

from rlhf.plumbing.errors import (
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
)
from rlhf.plumbing.info import server_info
from rlhf.plumbing.logs import current_request_id
from rlhf.v1 import common_pb2, policy_pb2, policy_pb2_grpc
from services.policy import push
from services.policy.adapters import AdapterRegistry, Kept, Lease, check_name
from services.policy.config import PolicyConfig
from services.policy.engine import CompletionDelta, Engine, Sampling
from services.policy.requests import (
    Limits,
    max_tokens_for,
    prompt_token_ids,
    sampling_from_proto,
)
from services.policy.stats import EngineStats

log = logging.getLogger("rlhf.policy")

FINISH = {
    "stop": policy_pb2.FINISH_REASON_STOP,
    "length": policy_pb2.FINISH_REASON_LENGTH,
    "abort": policy_pb2.FINISH_REASON_ABORT,
    None: policy_pb2.FINISH_REASON_UNSPECIFIED,
}


class Admission:
    """Bounded admission: sequences (prompts x n) in flight; beyond the bound, refuse at once
    rather than queue without limit."""

    def __init__(self, limit: int, stats: EngineStats):
        self.limit = limit
        self.pending = 0
        self.stats = stats

    def admit(self, sequences: int):
        if self.pending + sequences > self.limit:
            self.stats.rejected.inc()
            raise ResourceExhausted(
                f"policy is at its admission limit: {self.pending} sequences in flight, this call "
                f"adds {sequences}, limit {self.limit} (max_pending_sequences); retry with backoff"
            )
        self.pending += sequences
        self.stats.pending.set(self.pending)
        return _Admitted(self, sequences)


class _Admitted:
    def __init__(self, admission: Admission, n: int):
        self.admission, self.n = admission, n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.admission.pending -= self.n
        self.admission.stats.pending.set(self.admission.pending)


def served_by(key: tuple[str, int] | None) -> policy_pb2.ServedBy:
    if key is None:
        return policy_pb2.ServedBy(base=True)
    return policy_pb2.ServedBy(adapter=policy_pb2.AdapterRef(name=key[0], version=key[1]))


def _selector(sel: policy_pb2.AdapterSelector) -> tuple[str, tuple[str, int] | None]:
    if sel.target == policy_pb2.ADAPTER_TARGET_BASE:
        return "base", None
    if sel.target == policy_pb2.ADAPTER_TARGET_PINNED:
        check_name(sel.pinned.name)
        if sel.pinned.version < 1:
            raise InvalidArgument("adapter.pinned.version must be >= 1")
        return "pinned", (sel.pinned.name, sel.pinned.version)
    return "active", None


def _top(delta: CompletionDelta) -> list[policy_pb2.TopLogprobs]:
    return [
        policy_pb2.TopLogprobs(token_ids=[t for t, _ in step], logprobs=[lp for _, lp in step])
        for step in delta.top_logprobs
    ]


def adapter_info(kept: Kept, active: tuple[str, int] | None) -> policy_pb2.AdapterInfo:
    ts = Timestamp()
    ts.FromNanoseconds(int(kept.loaded_at * 1e9))
    return policy_pb2.AdapterInfo(
        adapter=policy_pb2.AdapterRef(name=kept.handle.name, version=kept.handle.version),
        sha256=kept.sha256, size_bytes=kept.size_bytes, rank=kept.rank,
        target_modules=kept.target_modules, loaded_at=ts, active=kept.key == active,
        in_flight_requests=kept.in_flight,
    )


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, config: PolicyConfig, engine: Engine, registry: AdapterRegistry,
                 tokenizer, shapes: push.BaseShapes, stats: EngineStats, is_ready):
        self.config = config
        self.engine = engine
        self.registry = registry
        self.tokenizer = tokenizer
        self.shapes = shapes
        self.stats = stats
        self.is_ready = is_ready
        self.admission = Admission(config.max_pending_sequences, stats)
        self.push_limits = push.Limits(
            base_model_id=config.resolved_base_model_id(),
            max_rank=config.max_lora_rank,
            max_bytes=config.max_adapter_bytes,
        )

    @property
    def limits(self) -> Limits:
        cfg = self.config
        return Limits(
            max_model_len=self.engine.max_model_len, vocab_size=self.engine.vocab_size,
            max_n=cfg.max_n, max_prompts=cfg.max_prompts_per_request,
            default_max_tokens=cfg.default_max_tokens,
        )

    # ------------------------------------------------------------------ auth

    def _check_admin(self, context) -> None:
        token = self.config.admin_token
        if not token:
            return  # open (warned about at start-up)
        given = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and value.startswith("Bearer "):
                given = value[len("Bearer "):]
            elif key == "x-admin-token":
                given = value
        if given is None:
            raise Unauthenticated(
                "this call changes the served model: send the admin token as "
                "'authorization: Bearer <token>' metadata"
            )
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise PermissionDenied("the admin token is wrong")

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
        return [final[i] for i in sorted(final)], (served_by(now) if switched else None)

    def _prepare(self, prompts, params, single: bool = False):
        limits = self.limits
        sampling = sampling_from_proto(params, limits)
        prepared = []
        for i, prompt in enumerate(prompts):
            where = "prompt" if single else f"prompts[{i}]"
            ids = prompt_token_ids(prompt, self.tokenizer, limits, where)
            max_tokens = max_tokens_for(sampling, len(ids), limits, where)
            prepared.append((ids, replace(sampling, max_tokens=max_tokens)))
        return sampling, prepared

    async def Generate(self, request, context):
        if not request.prompts:
            raise InvalidArgument("prompts is empty: send at least one prompt")
        if len(request.prompts) > self.config.max_prompts_per_request:
            raise InvalidArgument(
                f"{len(request.prompts)} prompts; this server takes at most "
                f"{self.config.max_prompts_per_request} per call"
            )
        sampling, prepared = self._prepare(request.prompts, request.params)
        target, pinned = _selector(request.adapter)
        rid = current_request_id()
        tag = uuid.uuid4().hex[:8]
        with self.admission.admit(len(prepared) * sampling.n):
            async with self.registry.lease(target, pinned, len(prepared)) as lease:
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
        generated = 0
        for i, ((ids, _), task) in enumerate(zip(prepared, tasks, strict=True)):
            completions, finished_by = task.result()
            result = response.results.add(prompt_index=i, prompt_token_ids=ids,
                                          served_by=served_by(lease.served),
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
        sampling, [(ids, s)] = self._prepare([request.prompt], request.params, single=True)
        target, pinned = _selector(request.adapter)
        rid = f"{current_request_id()}-{uuid.uuid4().hex[:8]}"
        generated = 0
        with self.admission.admit(sampling.n):
            async with self.registry.lease(target, pinned) as lease:
                self.stats.prompt_tokens.inc(len(ids))
                yield policy_pb2.GenerateStreamResponse(
                    served_by=served_by(lease.served), prompt_token_ids=ids
                )
                async for out in self.engine.generate(ids, s, rid, lease.handle, stream=True,
                                                      on_submit=lease.submitted):
                    for c in out.completions:
                        if not c.token_ids and c.finish_reason is None:
                            continue
                        generated += len(c.token_ids)
                        yield policy_pb2.GenerateStreamResponse(
                            index=c.index, text_delta=c.text, token_ids=c.token_ids,
                            logprobs=c.logprobs, top_logprobs=_top(c),
                            finish_reason=FINISH.get(c.finish_reason), stop_string=c.stop_string,
                        )
                now, switched = self.registry.finished_by(lease)
        self.stats.generated_tokens.inc(generated)
        yield policy_pb2.GenerateStreamResponse(
            usage=common_pb2.Usage(prompt_tokens=len(ids), completion_tokens=generated),
            finished_by=served_by(now) if switched else None,
        )

    # ------------------------------------------------------------------ adapters

    async def PushAdapter(self, request_iterator, context):
        try:
            response = await self._push(request_iterator, context)
        except ServiceError as exc:
            if not isinstance(exc, (Unauthenticated, PermissionDenied)):
                self.stats.adapter_loads.labels("refused").inc()
            raise
        except Exception:
            self.stats.adapter_loads.labels("failed").inc()
            raise
        self.stats.adapter_loads.labels("ok").inc()
        self.stats.adapter_load_seconds.observe(response.load_seconds)
        return response

    async def _push(self, request_iterator, context):
        self._check_admin(context)
        stream = request_iterator.__aiter__()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("empty push: send the header first, then data") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("the first message of a push must be the header")
        header = first.header
        peft = push.check_header(header, self.push_limits, self.shapes)
        name = header.adapter.name
        async with self.registry.name_lock(name):
            version = header.adapter.version or self.registry.next_version(name)
            same = self.registry.check_new_version(name, version, header.sha256)
            if same is not None:  # idempotent re-push: nothing to store
                activated = False
                if not header.skip_activate and self.registry.active != same.key:
                    await self.registry.set_active(same.key)
                    activated = True
                return policy_pb2.PushAdapterResponse(
                    adapter=adapter_info(same, self.registry.active), activated=activated
                )
            staged, size = await push.receive(header, stream, self.registry.incoming_dir())
            self.stats.pushed_bytes.inc(size)
            try:
                push.check_weights(staged, self.shapes, self.config.max_lora_rank)
                meta = {
                    "name": name, "version": version, "sha256": header.sha256,
                    "size_bytes": size, "rank": peft["r"],
                    "target_modules": sorted(peft["target_modules"])
                    if isinstance(peft["target_modules"], list) else [peft["target_modules"]],
                    "base_model_id": header.base_model_id, "loaded_at": time.time(),
                }
                kept, seconds = await self.registry.install(
                    staged, meta, activate=not header.skip_activate
                )
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise
        log.info("adapter %s@v%d loaded in %.3fs%s", name, version, seconds,
                 "" if header.skip_activate else " and active")
        return policy_pb2.PushAdapterResponse(
            adapter=adapter_info(kept, self.registry.active),
            activated=not header.skip_activate, load_seconds=seconds,
        )

    async def SetActiveAdapter(self, request, context):
        self._check_admin(context)
        key = None
        if not request.base:
            check_name(request.adapter.name)
            key = (request.adapter.name, request.adapter.version)
        previous, now = await self.registry.set_active(key)
        return policy_pb2.SetActiveAdapterResponse(previous=served_by(previous),
                                                   active=served_by(now))

    async def ListAdapters(self, request, context):
        kept = self.registry.kept()
        if request.name:
            kept = [k for k in kept if k.handle.name == request.name]
        return policy_pb2.ListAdaptersResponse(
            adapters=[adapter_info(k, self.registry.active) for k in kept],
            active=served_by(self.registry.active),
            next_version=self.registry.next_version(request.name) if request.name else 0,
        )

    async def GetInfo(self, request, context):
        cfg = self.config
        return policy_pb2.PolicyServiceGetInfoResponse(
            server=server_info("policy", self.is_ready()),
            base_model_id=cfg.resolved_base_model_id(),
            max_model_len=self.engine.max_model_len,
            max_n=cfg.max_n,
            max_prompts_per_request=cfg.max_prompts_per_request,
            max_lora_rank=cfg.max_lora_rank,
            max_adapter_bytes=cfg.max_adapter_bytes,
            keep_versions=cfg.keep_versions,
            adapter_mode=(policy_pb2.ADAPTER_MODE_MERGED if cfg.adapter_mode == "merged"
                          else policy_pb2.ADAPTER_MODE_LORA),
            active=served_by(self.registry.active),
            engine=f"{self.engine.name} {getattr(self.engine, 'version', '')}".strip(),
            dtype=self.engine.dtype,
            default_max_tokens=cfg.default_max_tokens,
        )

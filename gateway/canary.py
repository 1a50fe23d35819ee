"""The gateway's canary: a staged adapter version serves `canary_fraction` of the `policy`
traffic, both arms are scored on the reward service, and the version is promoted (activated on
every replica) or rolled back (its staging ended on every replica without activating it:
KeepAdapter, so the learner's rollouts pinned to it still run; users never get it unless they
name it) by gateway.canary_rule.

Discovery: every `canary_poll_seconds` the gateway lists the adapters of every policy replica; a
version of `adapter_name` that is staged (AdapterInfo.staged: pushed with stage_seconds, not
committed) on every replica starts a trial. The trainer learns the verdict where it already
looks, on the replicas: the version active (promoted) or neither staged nor active (rolled
back); the reasons and figures are logged, kept for GET /v1/admin/canary, and exported as
metrics.

Routing: only requests for model `policy` (best-of-n, completions, chat; not streams) take part;
a request naming `policy@vN` or `base` is never rerouted. The split is deterministic: the k-th
routed request goes to the candidate only while candidate answers stay <= fraction * k, so the
candidate's share never exceeds the fraction. A candidate call the replicas refuse (the version
gone) is answered by the incumbent and counted as a candidate error."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from dataclasses import dataclass, field
from statistics import fmean

import grpc
from fastapi import APIRouter

from gateway.canary_rule import ArmStats, Rule, Verdict, due, judge
from gateway.errors import APIError
from gateway.metrics import GatewayMetrics
from gateway.state import Caller, State
from rlhf.clients import CallFailed
from rlhf.v1 import policy_pb2

log = logging.getLogger("rlhf.gateway.canary")

CANDIDATE, INCUMBENT = "candidate", "incumbent"
# Requests whose answers are being ranked by their endpoint: their scores come back through
# `rewarded`; bounded so requests that fail after sampling cannot grow it.
_PENDING = 4096
_DECISIONS_KEPT = 20
# A refused candidate call: the version is not (or no longer) on the replica that got the call.
_GONE = (404, 409)


@dataclass
class Trial:
    name: str
    version: int
    incumbent: str  # "policy@vN" or "base"
    started: float  # time.time()
    deadline: float
    arms: dict[str, ArmStats] = field(
        default_factory=lambda: {CANDIDATE: ArmStats(), INCUMBENT: ArmStats()})
    routed: int = 0
    to_candidate: int = 0
    verdict: Verdict | None = None
    applied: bool = False

    def summary(self) -> dict:
        out = {"version": self.version, "incumbent": self.incumbent, "started": self.started,
               "deadline": self.deadline, "routed": self.routed,
               "to_candidate": self.to_candidate,
               "arms": {arm: stats.figures() for arm, stats in self.arms.items()}}
        if self.verdict is not None:
            out.update(decision="promoted" if self.verdict.promote else "rolled_back",
                       reasons=self.verdict.reasons, figures=self.verdict.figures,
                       applied=self.applied)
        return out


class Canary:
    def __init__(self, config, upstreams, metrics: GatewayMetrics, admin_token: str | None,
                 clock=time.time):
        self.config = config
        self.upstreams = upstreams
        self.metrics = metrics
        self.token = admin_token
        self.clock = clock
        self.rule = Rule(min_requests=config.canary_min_requests,
                         margin_sd=config.canary_margin_sd, alpha=config.canary_alpha,
                         max_error_increase=config.canary_max_error_increase,
                         max_latency_ratio=config.canary_max_latency_ratio)
        self.trial: Trial | None = None
        self.decisions: collections.deque[dict] = collections.deque(maxlen=_DECISIONS_KEPT)
        self._finished: set[int] = set()  # versions whose trial ended in this process
        self._pending: collections.OrderedDict[str, tuple[Trial, str]] = (
            collections.OrderedDict())
        self._tasks: set[asyncio.Task] = set()
        self._random = random.Random()
        self._lock = asyncio.Lock()
        # Every series from zero, so increase() sees the first verdict of each kind.
        for decision in ("promoted", "rolled_back", "superseded"):
            metrics.canary_decisions.labels(decision)
        for arm in (CANDIDATE, INCUMBENT):
            for outcome in ("ok", "error"):
                metrics.canary_requests.labels(arm, outcome)

    # ---- serving -----------------------------------------------------------------------------

    def _route(self, selector: policy_pb2.AdapterSelector) -> tuple[Trial | None, str]:
        trial = self.trial
        if (trial is None or trial.verdict is not None
                or selector.target not in (policy_pb2.ADAPTER_TARGET_ACTIVE,
                                           policy_pb2.ADAPTER_TARGET_UNSPECIFIED)):
            return None, ""
        trial.routed += 1
        if trial.to_candidate + 1 <= self.config.canary_fraction * trial.routed:
            trial.to_candidate += 1
            return trial, CANDIDATE
        return trial, INCUMBENT

    async def generate(self, request: policy_pb2.GenerateRequest, request_id: str,
                       ranked: bool) -> policy_pb2.GenerateResponse:
        """Generate through the canary. `ranked`: the endpoint scores the answers itself and
        passes the scores to `rewarded`; otherwise a share of the answers is scored here, off
        the request's path."""
        trial, arm = self._route(request.adapter)
        if trial is None:
            return await self.upstreams.generate(request, request_id)
        sent = request
        if arm == CANDIDATE:
            sent = policy_pb2.GenerateRequest()
            sent.CopyFrom(request)
            sent.adapter.CopyFrom(policy_pb2.AdapterSelector(
                target=policy_pb2.ADAPTER_TARGET_PINNED,
                pinned=policy_pb2.AdapterRef(name=trial.name, version=trial.version)))
        start = time.perf_counter()
        try:
            response = await self.upstreams.generate(sent, request_id)
        except APIError as exc:
            if exc.status >= 500 or (arm == CANDIDATE and exc.status in _GONE):
                self._observe(trial, arm, False, time.perf_counter() - start)
            if arm == CANDIDATE and exc.status in _GONE:
                return await self.upstreams.generate(request, request_id)
            raise
        self._observe(trial, arm, True, time.perf_counter() - start)
        if ranked:
            self._pending[request_id] = (trial, arm)
            while len(self._pending) > _PENDING:
                self._pending.popitem(last=False)
        elif self._random.random() < self.config.canary_score_fraction:
            task = asyncio.create_task(self._score(trial, arm, request, response, request_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return response

    def rewarded(self, request_id: str, scores: list[list[float | None]]) -> None:
        """The scores an endpoint ranked a canary request's answers by (per prompt)."""
        held = self._pending.pop(request_id, None)
        if held is not None:
            self._reward(*held, [s for per_prompt in scores for s in per_prompt if s is not None])

    async def _score(self, trial: Trial, arm: str, request: policy_pb2.GenerateRequest,
                     response: policy_pb2.GenerateResponse, request_id: str) -> None:
        from gateway.generation import score_all

        try:
            ranked = await score_all(self.upstreams, list(request.prompts), response,
                                     request_id, canary=False)
        except APIError as exc:
            log.warning("canary: scoring request %s failed: %s", request_id, exc.message)
            return
        self._reward(trial, arm, [s for r in ranked for s in r.scores if s is not None])

    def _observe(self, trial: Trial, arm: str, ok: bool, seconds: float) -> None:
        trial.arms[arm].record(ok, seconds)
        self.metrics.canary_requests.labels(arm, "ok" if ok else "error").inc()
        self.metrics.canary_latency.labels(arm).observe(seconds)

    def _reward(self, trial: Trial, arm: str, scores: list[float]) -> None:
        if not scores or trial.verdict is not None:
            return
        stats = trial.arms[arm]
        stats.rewards.append(fmean(scores))
        self.metrics.canary_scored.labels(arm).inc()
        self.metrics.canary_reward.labels(arm).set(stats.mean_reward)
        if due(trial.arms[CANDIDATE], trial.arms[INCUMBENT], self.rule):
            self._decide(trial, "enough answers")
            self._spawn(self.apply())

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- trials ------------------------------------------------------------------------------

    def _decide(self, trial: Trial, why: str) -> None:
        if trial.verdict is not None:
            return
        trial.verdict = judge(trial.arms[CANDIDATE], trial.arms[INCUMBENT], self.rule)
        decision = "promoted" if trial.verdict.promote else "rolled_back"
        self.metrics.canary_decisions.labels(decision).inc()
        log.warning("canary %s@v%d %s (%s, after %.0f s): %s; figures %s", trial.name,
                    trial.version, decision.replace("_", " "), why,
                    self.clock() - trial.started,
                    "; ".join(trial.verdict.reasons) or "not worse than the incumbent",
                    trial.verdict.figures)
        self.decisions.append(trial.summary())

    def _start(self, name: str, version: int, incumbent: str) -> None:
        now = self.clock()
        self.trial = Trial(name, version, incumbent, now, now + self.config.canary_max_seconds)
        self.metrics.canary_active.set(1)
        self.metrics.canary_version.set(version)
        self.metrics.canary_deadline.set(self.trial.deadline)
        for arm in (CANDIDATE, INCUMBENT):
            self.metrics.canary_reward.labels(arm).set(0)
        log.warning("canary of %s@v%d started against %s: %.0f%% of `policy` traffic, a verdict "
                    "after %d scored answers per arm or %.0f s", name, version, incumbent,
                    100 * self.config.canary_fraction, self.rule.min_requests,
                    self.config.canary_max_seconds)

    def _end(self, outcome: str) -> None:
        trial, self.trial = self.trial, None
        if trial is not None:
            self._finished.add(trial.version)
            if outcome == "superseded":
                self.metrics.canary_decisions.labels(outcome).inc()
                self.decisions.append({**trial.summary(), "decision": outcome})
        self.metrics.canary_active.set(0)
        self.metrics.canary_deadline.set(0)

    async def _listings(self) -> dict[str, policy_pb2.ListAdaptersResponse]:
        policy = self.upstreams.policy
        endpoints = policy.endpoints()
        listed = await asyncio.gather(*(policy.list_adapters(
            self.config.adapter_name, endpoint=ep, timeout=10.0) for ep in endpoints))
        return dict(zip(endpoints, listed, strict=True))

    async def tick(self) -> None:
        """One poll: start a trial on a newly staged version, time one out, or finish applying
        a verdict."""
        async with self._lock:
            listings = await self._listings()
            trial = self.trial
            if trial is not None and trial.verdict is not None:
                await self._apply(trial, listings)
                return
            if trial is not None:
                if not all(_staged(lst, trial.version) for lst in listings.values()):
                    log.warning("canary of %s@v%d ended: the version is no longer staged on "
                                "every replica (committed or dropped by someone else)",
                                trial.name, trial.version)
                    self._end("superseded")
                elif self.clock() >= trial.deadline:
                    self._decide(trial, f"deadline of {self.config.canary_max_seconds:g} s")
                    await self._apply(trial, listings)
                return
            versions = [{a.adapter.version for a in lst.adapters if a.staged}
                        for lst in listings.values()]
            staged = set.intersection(*versions) - self._finished if versions else set()
            if staged:
                actives = {_served(lst.active, self.config.adapter_name)
                           for lst in listings.values()}
                self._start(self.config.adapter_name, max(staged), ", ".join(sorted(actives)))

    async def apply(self) -> None:
        async with self._lock:
            trial = self.trial
            if trial is not None and trial.verdict is not None:
                try:
                    await self._apply(trial, await self._listings())
                except CallFailed as err:
                    self.metrics.canary_apply_failures.inc()
                    log.warning("canary verdict on v%d not applied yet (%s); retried at the "
                                "next poll", trial.version, err)

    async def _apply(self, trial: Trial, listings: dict[str, policy_pb2.ListAdaptersResponse]
                     ) -> None:
        """Promotes on (or unstages from) every replica that is not there yet; the trial ends
        once all are. A failing replica is retried at each poll."""
        ref = policy_pb2.AdapterRef(name=trial.name, version=trial.version)
        auth = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        pending = []
        for endpoint, listing in listings.items():
            kept = {a.adapter.version: a for a in listing.adapters}
            info = kept.get(trial.version)
            if trial.verdict.promote:
                done = info is not None and info.active
            else:
                done = info is None or not (info.staged or info.active)
            if not done:
                pending.append(endpoint)
        failures = []
        for endpoint in pending:
            stub = self.upstreams.policy.stub_to(endpoint)
            try:
                if trial.verdict.promote:
                    await stub.SetActiveAdapter(policy_pb2.SetActiveAdapterRequest(adapter=ref),
                                                metadata=auth, timeout=30.0)
                else:
                    await stub.KeepAdapter(policy_pb2.KeepAdapterRequest(adapter=ref),
                                           metadata=auth, timeout=30.0)
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{endpoint}: {exc.code().name}: {exc.details()}")
        if failures:
            self.metrics.canary_apply_failures.inc(len(failures))
            log.warning("canary verdict on %s@v%d not applied on %s; retried at the next poll",
                        trial.name, trial.version, "; ".join(failures))
            return
        trial.applied = True
        if self.decisions and self.decisions[-1].get("version") == trial.version:
            self.decisions[-1] = trial.summary()
        self._end("applied")

    async def run(self) -> None:
        """The poll loop, for the app's lifetime; a failed poll (policy down) is retried."""
        while True:
            try:
                await self.tick()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a policy outage
                log.warning("canary poll failed: %s", exc)
            await asyncio.sleep(self.config.canary_poll_seconds)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def status(self) -> dict:
        return {"enabled": True, "fraction": self.config.canary_fraction,
                "rule": {"min_requests": self.rule.min_requests,
                         "margin_sd": self.rule.margin_sd, "alpha": self.rule.alpha,
                         "max_error_increase": self.rule.max_error_increase,
                         "max_latency_ratio": self.rule.max_latency_ratio,
                         "max_seconds": self.config.canary_max_seconds},
                "trial": None if self.trial is None else self.trial.summary(),
                "decisions": list(self.decisions)}


def _staged(listing: policy_pb2.ListAdaptersResponse, version: int) -> bool:
    return any(a.adapter.version == version and a.staged for a in listing.adapters)


def _served(active: policy_pb2.ServedBy, adapter_name: str) -> str:
    if active.base or not active.adapter.name:
        return "base"
    return f"policy@v{active.adapter.version}" if active.adapter.name == adapter_name else (
        f"{active.adapter.name}@v{active.adapter.version}")


router = APIRouter()


@router.get("/v1/admin/canary", summary="The canary: its rule, the running trial and the latest "
                                        "verdicts with their figures (admin key)")
async def canary_status(state: State, caller: Caller) -> dict:
    if not state.is_admin(caller):
        raise APIError(403, "the canary's state needs an admin key (admin_api_keys)",
                       "admin_key_required")
    canary = state.upstreams.canary
    return canary.status() if canary is not None else {"enabled": False}

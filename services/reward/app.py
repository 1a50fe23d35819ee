"""Wires the reward service: scorer specs -> scorers (models loaded at start-up) -> mix ->
servicer, behind the shared server; with the versioned reward model (`rm:@active`), its admin
calls behind the admin token."""

from __future__ import annotations

import logging

import grpc

from rlhf.plumbing.auth import AdminAuthInterceptor, require_admin_token
from rlhf.plumbing.command import service_command
from rlhf.plumbing.errors import FailedPrecondition, Unavailable
from rlhf.plumbing.info import server_info
from rlhf.v1 import reward_pb2, reward_pb2_grpc
from services.reward.config import RewardConfig
from services.reward.metrics import RewardStats
from services.reward.mix import Mix
from services.reward.normalize import RunningNorm
from services.reward.rm_versions import VersionedScorer
from services.reward.scorers import Scorer, build_scorer
from services.reward.servicer import RewardServicer
from services.reward.spec import parse_specs

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardService"].full_name
# The calls that change the served reward model: they need the admin token.
ADMIN_METHODS = frozenset(
    f"/{SERVICE_NAME}/{name}" for name in ("PushRewardModel", "SetActiveRewardModel"))
log = logging.getLogger("rlhf.reward")


class _Deferred(reward_pb2_grpc.RewardServiceServicer):
    """Registered before start-up (gRPC needs its handlers before it starts); Score is forwarded
    once the scorers are loaded, UNAVAILABLE until then. GetInfo answers at once, with
    ready=false while loading."""

    def __init__(self, app: RewardApp):
        self.app = app

    async def Score(self, request, context):
        if self.app.servicer is None:
            raise Unavailable("the reward service is still loading; retry when health is SERVING")
        return await self.app.servicer.Score(request, context)

    async def GetInfo(self, request, context):
        return self.app.info()

    async def PushRewardModel(self, request_iterator, context):
        return await self.app.versions_or_refuse().push(request_iterator)

    async def SetActiveRewardModel(self, request, context):
        return await self.app.versions_or_refuse().set_active(request.version)

    async def ListRewardModels(self, request, context):
        return self.app.versions_or_refuse().list()


class RewardApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: RewardConfig):
        self.config = config
        self.stats = RewardStats()
        # Specs and rules are checked here, so a bad flag fails before any model loads.
        self.scorers: list[Scorer] = [
            build_scorer(spec, config, self.stats) for spec in parse_specs(config.scorer)
        ]
        self.servicer: RewardServicer | None = None
        self.ready = False
        versioned = [s for s in self.scorers if isinstance(s, VersionedScorer)]
        self.versions: VersionedScorer | None = versioned[0] if versioned else None
        # Server interceptors the GrpcServer installs after its own. The admin calls exist
        # only with a versioned reward model; only then is a token required.
        token = config.resolved_admin_token()
        if self.versions is not None:
            require_admin_token("reward service", token, config.insecure_no_auth,
                                f"{RewardConfig.env_prefix()}ADMIN_TOKEN")
        self.interceptors = (AdminAuthInterceptor(token, ADMIN_METHODS),) if token else ()

    def versions_or_refuse(self) -> VersionedScorer:
        if self.versions is None:
            raise FailedPrecondition(
                "this reward service has no versioned reward model: start it with "
                "--scorer rm:@active")
        if not self.ready:
            raise Unavailable("the reward service is still loading; retry when health is SERVING")
        return self.versions

    def normalized(self, scorer: Scorer) -> bool:
        mode = self.config.normalize
        return mode == "all" or (mode == "rm" and scorer.kind == "rm")

    def register(self, server: grpc.aio.Server) -> None:
        reward_pb2_grpc.add_RewardServiceServicer_to_server(_Deferred(self), server)

    async def startup(self) -> None:
        cfg = self.config
        if cfg.threads and any(s.kind == "rm" for s in self.scorers):
            import torch

            torch.set_num_threads(cfg.threads)
        started: list[Scorer] = []
        try:
            for scorer in self.scorers:
                await scorer.start()
                started.append(scorer)
        except BaseException:
            for scorer in started:
                await scorer.close()
            raise
        if not self.scorers:
            log.warning("no scorers configured: Score calls will fail (pass --scorer)")
        norms = {
            s.name: RunningNorm(cfg.normalize_freeze_after)
            for s in self.scorers
            if self.normalized(s)
        }
        self.servicer = RewardServicer(cfg, Mix(self.scorers, norms, self.stats), self.stats)
        self.ready = True

    async def shutdown(self) -> None:
        self.ready = False
        for scorer in self.scorers:
            await scorer.close()

    def info(self) -> reward_pb2.RewardServiceGetInfoResponse:
        cfg = self.config
        return reward_pb2.RewardServiceGetInfoResponse(
            server=server_info("reward", self.ready),
            scorers=[
                reward_pb2.ScorerInfo(name=s.name, kind=s.kind, weight=s.weight,
                                      normalized=self.normalized(s))
                for s in self.scorers
            ],
            max_batch_items=cfg.max_batch_items,
            max_text_chars=cfg.max_text_chars,
        )


command = service_command(RewardConfig, RewardApp)

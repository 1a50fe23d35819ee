"""RewardService over gRPC: validate the call, run the mix, map the result to the contract."""

from __future__ import annotations

import time

from rlhf.plumbing.errors import FailedPrecondition, InvalidArgument
from rlhf.plumbing.logs import current_request_id
from rlhf.v1 import reward_pb2
from services.reward.config import RewardConfig
from services.reward.items import parse_items
from services.reward.metrics import RewardStats
from services.reward.mix import Mix


class RewardServicer:
    def __init__(self, config: RewardConfig, mix: Mix, stats: RewardStats):
        self.config = config
        self.mix = mix
        self.stats = stats

    async def Score(self, request, context):
        cfg = self.config
        start = time.perf_counter()
        result = "error"
        try:
            if not self.mix.scorers:
                raise FailedPrecondition(
                    "no scorers configured: start the service with --scorer [WEIGHT*]KIND:ARG"
                )
            items = parse_items(request.items, cfg.max_batch_items, cfg.max_text_chars)
            scored = await self.mix.score(items)
            result = "ok"
        except InvalidArgument:
            result = "invalid"
            raise
        finally:
            self.stats.calls.labels(result).inc()
            self.stats.call_seconds.observe(time.perf_counter() - start)
        self.stats.items.inc(len(items))
        scorers = self.mix.scorers
        # One call is scored by one version per scorer, so the first item's versions are all.
        versions = scored[0].versions if scored else ()
        return reward_pb2.ScoreResponse(
            scores=[
                reward_pb2.ItemScore(
                    score=s.total,
                    by_scorer=[
                        reward_pb2.ScorerScore(scorer=sc.name, score=part, weight=sc.weight,
                                               model_version=version)
                        for sc, part, version in zip(scorers, s.parts, versions, strict=True)
                    ],
                )
                for s in scored
            ],
            request_id=current_request_id(),
            model_versions=[v for v in versions if v],
        )

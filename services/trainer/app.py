"""The trainer service: TrainerService (ppo/service.py) with the shared server plumbing;
`rlhf serve trainer` and `python -m services.trainer`.

StartRun and StopRun need the trainer's admin token; GetRun and WatchRun its read token or the
admin token. Without an admin token the service refuses to start, unless `--insecure-no-auth`.
"""

from __future__ import annotations

import logging

import grpc

from rlhf.plumbing.auth import AdminAuthInterceptor, require_admin_token
from rlhf.plumbing.command import service_command
from rlhf.v1 import trainer_pb2_grpc
from services.trainer.config import TrainerConfig
from services.trainer.ppo.runs import RunManager
from services.trainer.ppo.service import SERVICE_NAME, TrainerServicer

log = logging.getLogger("rlhf.trainer")
# Calls that start or stop training (and so change what the policy serves): the admin token.
ADMIN_METHODS = frozenset(f"/{SERVICE_NAME}/{m}" for m in ("StartRun", "StopRun"))
# Calls that only read runs: the read token or the admin token.
READ_METHODS = frozenset(f"/{SERVICE_NAME}/{m}" for m in ("GetRun", "WatchRun"))


class TrainerApp:
    service_names = (SERVICE_NAME,)

    def __init__(self, config: TrainerConfig):
        self.config = config
        token = config.resolved_admin_token()
        require_admin_token("trainer", token, config.insecure_no_auth,
                            f"{TrainerConfig.env_prefix()}ADMIN_TOKEN")
        self.interceptors = (
            (AdminAuthInterceptor(token, ADMIN_METHODS, read_token=config.resolved_read_token(),
                                  read_methods=READ_METHODS),) if token else ()
        )
        self.manager = RunManager(config)

    def register(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServiceServicer_to_server(TrainerServicer(self.manager),
                                                              server)

    async def startup(self) -> None:
        self.config.resolved_runs_dir().mkdir(parents=True, exist_ok=True)
        missing = [key for key in ("policy_addr", "reward_addr") if not getattr(self.config, key)]
        if missing:
            log.warning("no %s configured: StartRun will refuse runs until it is",
                        " and no ".join(missing))

    async def shutdown(self) -> None:
        await self.manager.stop_all()


command = service_command(TrainerConfig, TrainerApp)

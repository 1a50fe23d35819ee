"""Security drills for experiment tracking (issue 20 point 5): tracking stores are shared and
often uploaded, so secrets must never reach them, and `report_to` arriving in a StartRun request
is checked like any other field.

- 20.5: the policy admin token in a run's settings never reaches the logged config;
- 20.5: config keys named like secrets never reach a tracker's files, at any depth;
- 20.5: a StartRun whose report_to is huge or names an unknown tracker is INVALID_ARGUMENT with a
  short message, and no run starts.
"""

from __future__ import annotations

import json

import grpc
import pytest

from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.ppo.settings import PPOSettings
from services.trainer.tracking import open_tracker, settings_config

TRACKING_SECRET = "tracking-drill-s3cret-value"


def test_tracking_config_never_holds_the_admin_token(tmp_path):
    """20.5: a run's settings carry the policy admin token (for pushes); the config it logs to
    its tracker holds every other setting and not the token."""
    settings = PPOSettings.load(None, admin_token=TRACKING_SECRET, steps=3,
                                report_to="tensorboard")
    config = settings_config(settings)
    assert config["steps"] == 3 and config["report_to"] == "tensorboard"
    assert TRACKING_SECRET not in json.dumps(config)


def test_tracking_files_hold_no_key_named_like_a_secret(tmp_path):
    """20.5: whatever config a stage hands the tracker, keys named like secrets (token, secret,
    password, api key, credential) are dropped at any depth before anything is written."""
    config = {"lr": 0.1, "admin_token": TRACKING_SECRET,
              "peer": {"api_key": TRACKING_SECRET, "host": "h"},
              "logins": [{"password": TRACKING_SECRET}]}
    with open_tracker("tensorboard", tmp_path, config) as tracker:
        tracker.log({"step": 1, "loss": 0.5}, 1)
    written = b"".join(p.read_bytes() for p in (tmp_path / "tb").iterdir())
    assert b"0.1" in written and b"host" in written
    assert TRACKING_SECRET.encode() not in written


@pytest.mark.parametrize("report_to", ["x" * 200_000, "tensorboard,comet"])
async def test_tracking_start_run_refuses_a_bad_report_to(tmp_path, report_to):
    """20.5: report_to from a StartRun request is validated with the run's settings: a huge value
    or an unknown tracker is INVALID_ARGUMENT, its message bounded, and no run is created."""
    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=tmp_path, prompts=prompts,
                             policy_addr=["127.0.0.1:1"], reward_addr=["127.0.0.1:1"],
                             insecure_no_auth=True, drain_grace_seconds=1)
    server = await GrpcServer(cfg, TrainerApp(cfg)).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.StartRun(trainer_pb2.StartRunRequest(
                    run_id="tracked", config=trainer_pb2.RunConfig(report_to=report_to)))
            with pytest.raises(grpc.aio.AioRpcError) as lookup:
                await stub.GetRun(trainer_pb2.GetRunRequest(run_id="tracked"))
    finally:
        await server.shutdown()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "report_to" in err.value.details() and len(err.value.details()) < 400
    assert lookup.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (tmp_path / "runs" / "tracked").exists()

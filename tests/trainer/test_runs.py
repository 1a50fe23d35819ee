"""TrainerService and `rlhf train ppo` without the peers a run needs: refused with a message that
names the missing key, at StartRun and at the command's start-up; a run's settings take the
trainer's peers, TLS and admin token, and the request's paths resolved under the allowed roots."""

from __future__ import annotations

import grpc
import pytest
from click.testing import CliRunner

from rlhf.plumbing.config import ClientTLS
from rlhf.plumbing.errors import InvalidArgument
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.app import TrainerApp
from services.trainer.config import TrainerConfig
from services.trainer.ppo.runs import settings_from_proto


async def test_start_run_without_peers_names_the_missing_keys(tiny_model_dir, short_prompts,
                                                              tmp_path):
    cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=tmp_path,
                             model=tiny_model_dir, prompts=short_prompts,
                             reward_addr=["127.0.0.1:1"], drain_grace_seconds=1,
                             insecure_no_auth=True)
    server = await GrpcServer(cfg, TrainerApp(cfg)).start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            try:
                await stub.StartRun(trainer_pb2.StartRunRequest(run_id="r",
                                                                config=trainer_pb2.RunConfig()))
            except grpc.aio.AioRpcError as exc:
                err = exc
            else:
                raise AssertionError("StartRun without a policy address was accepted")
    finally:
        await server.shutdown()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no policy_addr configured" in err.details()
    assert "RLHF_TRAINER_POLICY_ADDR" in err.details()
    assert "reward_addr" not in err.details()


def test_run_settings_take_the_trainers_peers_tls_and_token(tmp_path):
    tls = ClientTLS(ca_file=tmp_path / "ca.pem", server_name_override="policy")
    cfg = TrainerConfig.load(data_dir=tmp_path, policy_addr=["10.0.0.1:50051"],
                             reward_addr=["10.0.0.2:50052"], prompts=tmp_path / "p.jsonl",
                             client_tls=tls, policy_admin_token="t0ken")
    run = settings_from_proto(trainer_pb2.RunConfig(steps=3, checkpoint_every=2), cfg, "r1")
    assert (run.policy_addr, run.reward_addr) == (["10.0.0.1:50051"], ["10.0.0.2:50052"])
    assert run.client_tls == tls and run.admin_token == "t0ken"
    assert (run.steps, run.checkpoint_every, run.out) == (3, 2, tmp_path / "runs" / "r1")


def test_train_ppo_without_peers_is_a_usage_error(short_prompts, tmp_path):
    from rlhf.cli import main

    result = CliRunner().invoke(main, ["train", "ppo", "--prompts", str(short_prompts),
                                       "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "a run needs policy_addr, reward_addr" in result.output


def test_request_paths_resolve_under_the_roots_and_the_configured_model(tiny_model_dir,
                                                                        short_prompts, tmp_path):
    """A request may name the trainer's configured model (wherever it lies) and anything under
    data_dir; the run then uses the resolved paths."""
    data = tmp_path / "data"
    (data / "sft").mkdir(parents=True)
    (data / "inputs").symlink_to(short_prompts.parent, target_is_directory=True)
    cfg = TrainerConfig.load(data_dir=data, policy_addr=["10.0.0.1:50051"],
                             reward_addr=["10.0.0.2:50052"], model=tiny_model_dir,
                             prompts=short_prompts, allowed_roots=[str(data)])
    run = settings_from_proto(trainer_pb2.RunConfig(
        model=str(tiny_model_dir), init_adapter=str(data / "sft")), cfg, "r1")
    assert (run.model, run.init_adapter) == (tiny_model_dir.resolve(), (data / "sft").resolve())
    assert run.prompts == short_prompts  # the configured default, trusted as configured
    # A symlink inside data_dir that leads out of it is judged by where it leads.
    with pytest.raises(InvalidArgument, match="prompts_path .* outside"):
        settings_from_proto(trainer_pb2.RunConfig(
            prompts_path=str(data / "inputs" / short_prompts.name)), cfg, "r2")

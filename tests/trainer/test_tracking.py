"""Experiment tracking (services/trainer/tracking.py): TensorBoard event files read back after real
SFT, reward-model and PPO runs on the tiny model (scalar tags = the numeric metrics.jsonl keys,
same values, the run's config logged), a resumed run's redone steps superseding the lost ones,
`none` writing nothing, a missing package refused when the settings are checked (every stage,
the commands, StartRun), and a tracker that fails mid-run leaving the run alone."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from rlhf.plumbing.config import ConfigError
from rlhf.plumbing.errors import InvalidArgument
from rlhf.plumbing.server import GrpcServer
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from services.trainer.ppo.learner import Hooks, Learner
from services.trainer.ppo.runs import settings_from_proto
from services.trainer.ppo.settings import PPOSettings
from services.trainer.rm.settings import RMSettings
from services.trainer.sft.settings import SFTSettings
from services.trainer.sft.train import METRICS_FILE, run_sft
from services.trainer.tracking import CONFIG_FILE, open_tracker, parse_report_to
from tests.fixtures.policy_helpers import ADMIN
from tests.fixtures.reward_helpers import synthetic_pairs, train_rm, write_jsonl
from tests.trainer.helpers import peers, run_settings

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the event files in `folder`, as (step, value) in order, as
    TensorBoard shows them (events of a restarted run's purged steps left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_figures(folder: Path, rows: list[dict], step_key: str) -> None:
    """The scalars in `folder` are exactly the numeric keys of `rows`, one point per row at the
    row's `step_key`, with the row's value (as float32)."""
    shown = tensorboard_scalars(folder)
    numeric = {k for row in rows for k, v in row.items() if isinstance(v, int | float)}
    assert set(shown) == numeric
    for key in numeric:
        expected = [(row[step_key], float(row[key])) for row in rows if key in row]
        assert [step for step, _ in shown[key]] == [step for step, _ in expected], key
        assert [v for _, v in shown[key]] == pytest.approx([v for _, v in expected],
                                                           rel=1e-6, abs=1e-6), key


# ---- the tracker on its own ---------------------------------------------------------------------


def test_report_to_names_are_checked_and_canonical():
    assert parse_report_to(" TensorBoard ,tensorboard") == "tensorboard"
    assert parse_report_to(["tensorboard"]) == "tensorboard"  # a YAML list
    assert parse_report_to("") == parse_report_to("none") == parse_report_to(None) == "none"
    with pytest.raises(ValueError, match="unknown tracker 'comet'"):
        parse_report_to("tensorboard,comet")
    with pytest.raises(ConfigError, match="report_to: unknown tracker"):
        PPOSettings.load(None, report_to="csv")


def test_none_writes_nothing(tmp_path):
    run = tmp_path / "run"
    with open_tracker("none", run, {"lr": 0.1}) as tracker:
        tracker.log({"step": 1, "loss": 0.5}, 1)
    assert not run.exists()


def test_strings_go_as_text_when_they_change_and_the_config_is_logged(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = {"lr": 0.001, "target_modules": ["q_proj"], "init_adapter": None}
    with open_tracker("tensorboard", tmp_path, config) as tracker:
        for step, version in [(1, "rm-v1"), (2, "rm-v1"), (3, "rm-v2")]:
            tracker.log({"step": step, "reward/mean": step / 10, "reward/model": version,
                         "extra": [1, 2]}, step)
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {"step", "reward/mean"}
    texts = acc.Tensors("reward/model/text_summary")
    assert [(e.step, e.tensor_proto.string_val[0].decode()) for e in texts] == [
        (1, "rm-v1"), (3, "rm-v2")]
    shown = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(shown.strip("`\n")) == config
    assert json.loads((tmp_path / "tb" / CONFIG_FILE).read_text()) == config


def test_a_tracker_failing_mid_run_warns_once_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    from torch.utils.tensorboard import SummaryWriter

    tracker = open_tracker("tensorboard", tmp_path, {})
    tracker.log({"loss": 1.0}, 1)

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "flush", disk_full)
    with caplog.at_level(logging.WARNING, logger="rlhf.trainer.tracking"):
        for step in (2, 3, 4):
            tracker.log({"loss": 1.0 / step}, step)  # never raises
        tracker.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "tensorboard" in warnings[0] and "No space left on device" in warnings[0]
    assert tracker.names == []


# ---- a missing package: refused when the settings are checked, before any work ------------------


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_package_is_a_settings_error_naming_it(package, tmp_path):
    if _installed(package):
        pytest.skip(f"{package} is installed here")
    data, out = tmp_path / "data.jsonl", tmp_path / "out"
    for stage, required in [(PPOSettings, {}), (SFTSettings, {"data": data, "out": out}),
                            (RMSettings, {"data": data, "out": out})]:
        with pytest.raises(ConfigError) as err:
            stage.load(None, report_to=f"tensorboard,{package}", **required)
        assert f"needs the Python package '{package}'" in str(err.value)
        assert f"pip install {package}" in str(err.value)


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_the_commands_refuse_a_missing_package_before_reading_anything(package, tmp_path):
    from rlhf.cli import main

    if _installed(package):
        pytest.skip(f"{package} is installed here")
    missing = str(tmp_path / "no-such.jsonl")  # the run would fail on it later, not first
    for args in (["train", "sft", "--data", missing, "--out", str(tmp_path / "sft")],
                 ["train", "rm", "--data", missing, "--out", str(tmp_path / "rm")],
                 ["train", "ppo", "--prompts", missing, "--out", str(tmp_path / "ppo"),
                  "--policy-addr", "127.0.0.1:1", "--reward-addr", "127.0.0.1:1"]):
        result = CliRunner().invoke(main, [*args, "--report-to", package])
        assert result.exit_code == 2, result.output
        assert f"pip install {package}" in result.output
        assert "Traceback" not in result.output


def test_start_run_refuses_a_missing_package_as_invalid_argument(tmp_path):
    from services.trainer.config import TrainerConfig

    if _installed("mlflow"):
        pytest.skip("mlflow is installed here")
    cfg = TrainerConfig.load(data_dir=tmp_path, policy_addr=["10.0.0.1:50051"],
                             reward_addr=["10.0.0.2:50052"], prompts=tmp_path / "p.jsonl")
    with pytest.raises(InvalidArgument, match="pip install mlflow"):
        settings_from_proto(trainer_pb2.RunConfig(report_to="mlflow"), cfg, "r1")
    run = settings_from_proto(trainer_pb2.RunConfig(report_to="tensorboard"), cfg, "r2")
    assert run.report_to == "tensorboard"


# ---- real runs on the tiny model -----------------------------------------------------------------


def test_sft_run_logs_its_epochs_and_config(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": f"Say {i}.", "response": "red green"}
                                               for i in range(4)])
    out = tmp_path / "adapter"
    # An earlier run that stopped mid-way left only its tracking folder: the run takes the
    # folder, and its epoch 1 is superseded by the new run's.
    with open_tracker("tensorboard", out, {}) as stale:
        stale.log({"epoch": 1, "loss": 99.0}, 1)
    settings = SFTSettings(data=data, out=out, model=tiny_model_dir, epochs=2, batch_size=2,
                           max_length=32, lora_r=4, lora_alpha=8, progress=False,
                           report_to="tensorboard")
    run_sft(settings)
    rows = jsonl(out / METRICS_FILE)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert_same_figures(out / "tb", rows, "epoch")
    config = json.loads((out / "tb" / CONFIG_FILE).read_text())
    assert config == json.loads(settings.model_dump_json())
    assert (out / "adapter_config.json").is_file()


def test_rm_command_logs_its_epochs(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(32, seed=3))
    out = tmp_path / "rm"
    train_rm(data, out, "--model", str(tiny_model_dir), "--epochs", "2", "--batch-size", "16",
             "--val-fraction", "0.25", "--lora-r", "4", "--max-length", "48",
             "--report-to", "tensorboard")
    rows = jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "val_accuracy"} <= set(rows[0])
    assert_same_figures(out / "tb", rows, "epoch")
    assert json.loads((out / "tb" / CONFIG_FILE).read_text())["report_to"] == "tensorboard"


async def test_ppo_resumed_run_shows_each_step_once(tiny_model_dir, short_prompts, tmp_path):
    out = tmp_path / "ppo"

    def crash_after_step_3(metrics: dict) -> None:
        if metrics["step"] == 3:
            raise RuntimeError("crash after step 3")

    async with peers(tiny_model_dir, tmp_path) as (policy, reward):
        run = run_settings(tiny_model_dir, short_prompts, out, policy, reward, steps=4,
                           checkpoint_every=2, report_to="tensorboard")
        with pytest.raises(RuntimeError, match="crash after step 3"):
            await Learner(run, Hooks(on_metrics=crash_after_step_3)).run()
        lost = tensorboard_scalars(out / "tb")["reward/mean"]
        assert [step for step, _ in lost] == [1, 2, 3]
        await Learner(run).run()  # redoes step 3 from the step-2 checkpoint
    rows = jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert_same_figures(out / "tb", rows, "step")


async def test_trainer_service_run_reports_to_tensorboard(tiny_model_dir, short_prompts,
                                                         tmp_path):
    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    async with peers(tiny_model_dir, tmp_path) as (policy, reward):
        cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=tmp_path / "trainer",
                                 policy_addr=[policy], reward_addr=[reward],
                                 model=tiny_model_dir, prompts=short_prompts,
                                 policy_admin_token=ADMIN, insecure_no_auth=True,
                                 drain_grace_seconds=1)
        server = await GrpcServer(cfg, TrainerApp(cfg)).start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = trainer_pb2_grpc.TrainerServiceStub(ch)
                run_cfg = trainer_pb2.RunConfig(
                    steps=2, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                    ppo_epochs=1, minibatch_size=4, lora_rank=4, report_to="tensorboard")
                started = await stub.StartRun(trainer_pb2.StartRunRequest(run_id="tracked",
                                                                          config=run_cfg))
                assert started.run.config.report_to == "tensorboard"
                async for _ in stub.WatchRun(trainer_pb2.WatchRunRequest(run_id="tracked")):
                    pass  # the stream ends with the run
                done = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id="tracked"))).run
        finally:
            await server.shutdown()
    assert done.state == trainer_pb2.RUN_STATE_COMPLETED, done.message
    folder = Path(done.out_dir)
    rows = jsonl(folder / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert_same_figures(folder / "tb", rows, "step")
    config = json.loads((folder / "tb" / CONFIG_FILE).read_text())
    assert config["report_to"] == "tensorboard" and config["steps"] == 2
    assert "admin_token" not in config and ADMIN not in json.dumps(config)

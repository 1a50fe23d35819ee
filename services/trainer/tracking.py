"""Experiment tracking for every training stage: a run's per-step figures and its config sent to
TensorBoard, MLflow or Weights & Biases, all offline, under the run's own folder.

    report_to: none | tensorboard | mlflow | wandb, or a comma list ("tensorboard,mlflow")
    <log_dir>/tb       TensorBoard event files, and config.json beside them
    <log_dir>/mlruns   an MLflow file store (view with `mlflow ui --backend-store-uri DIR`)
    <log_dir>/wandb    a W&B offline run (upload later, if wanted, with `wandb sync`)

The figures keep the keys of the stage's metrics.jsonl. Numbers (bools as 0/1) are scalars;
strings (such as a reward-model version) are text: TensorBoard text when the value changes,
an MLflow tag and a W&B summary entry holding the latest value. Other values are skipped.

Nothing here reaches the network: MLflow writes a local file store with its telemetry off, and
W&B runs in offline mode. A missing package is a settings error (`ReportTo` validates the field
when the settings are built, before any work), never a failure mid-run; a tracker that fails
mid-run (a full disk) logs one warning and stops, and training goes on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator

log = logging.getLogger("rlhf.trainer.tracking")

# tracker -> (module imported, pip package, folder under log_dir)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard", "tb"),
    "mlflow": ("mlflow", "mlflow", "mlruns"),
    "wandb": ("wandb", "wandb", "wandb"),
}
# Folders trackers write under a run folder (a stage that replaces its folder keeps these).
TRACKING_DIRS = tuple(folder for _, _, folder in TRACKERS.values())
CONFIG_FILE = "config.json"
# Config keys never sent to a tracker, at any depth: tracking stores are shared and uploaded.
SECRET_KEY_RE = re.compile(r"token|secret|password|passwd|api_?key|credential", re.IGNORECASE)
_MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on a param value
_MAX_REPORT_TO_CHARS = 100  # every tracker once, with room for spaces


def parse_report_to(value: Any) -> str:
    """The canonical form of a report_to value ("none" or a comma list of trackers, each once),
    or ValueError naming an unknown tracker or the pip command a missing package needs."""
    if value is None:
        return "none"
    if len(str(value)) > _MAX_REPORT_TO_CHARS:
        raise ValueError(f"report_to is {len(str(value))} characters; at most "
                         f"{_MAX_REPORT_TO_CHARS}")
    items = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for item in items:
        name = str(item).strip().lower()
        if name and name not in names:
            names.append(name)
    if names in ([], ["none"]):
        return "none"
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker {unknown[0][:40]!r}: report_to is none, or one or more "
                         f"of {', '.join(TRACKERS)} separated by commas")
    for name in names:
        module, package, _ = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ValueError(f"report_to {name} needs the Python package {package!r}, which is "
                             f"not installed here: pip install {package}")
    return ",".join(names)


# The settings field of every stage: `report_to: ReportTo = Field("none", description=...)`.
ReportTo = Annotated[str, BeforeValidator(parse_report_to)]
REPORT_TO_HELP = ("Experiment tracking, offline, under the run folder: none, tensorboard (OUT/tb),"
                  " mlflow (OUT/mlruns) or wandb (OUT/wandb); a comma list for several.")


def settings_config(settings: BaseModel) -> dict:
    """A stage's settings as the config a tracker logs: JSON values, without the fields kept
    out of the settings' repr (the admin token). `open_tracker` also drops keys named like
    secrets."""
    hidden = {name for name, field in type(settings).model_fields.items() if not field.repr}
    return settings.model_dump(mode="json", exclude=hidden)


def redact(config: Any) -> Any:
    """`config` without keys named like secrets, at any depth."""
    if isinstance(config, dict):
        return {k: redact(v) for k, v in config.items() if not SECRET_KEY_RE.search(str(k))}
    if isinstance(config, list):
        return [redact(v) for v in config]
    return config


def split_figures(metrics: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(numbers as floats, strings) of a metrics.jsonl row; other values are left out."""
    numbers, texts = {}, {}
    for key, value in metrics.items():
        if isinstance(value, bool | int | float):
            numbers[key] = float(value)
        elif isinstance(value, str):
            texts[key] = value
    return numbers, texts


class _Backend:
    name = ""

    def log(self, numbers: dict[str, float], texts: dict[str, str], step: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TensorBoard(_Backend):
    name = "tensorboard"

    def __init__(self, folder: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        from rlhf.files import atomic_write

        folder.mkdir(parents=True, exist_ok=True)
        # purge_step: a resumed run redoes the steps after its checkpoint; TensorBoard drops
        # the earlier events of those steps instead of drawing both.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=start_step)
        self.texts: dict[str, str] = {}
        shown = json.dumps(config, indent=2, sort_keys=True)
        atomic_write(folder / CONFIG_FILE, shown + "\n", 0o644)
        self.writer.add_text("config", "```\n" + shown + "\n```", global_step=start_step - 1)
        flat = {k: v if isinstance(v, bool | int | float | str) else json.dumps(v)
                for k, v in config.items() if v is not None}
        for summary in hparams(flat, {}):  # the HPARAMS tab, in this run's own event file
            self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, numbers, texts, step):
        for key, value in numbers.items():
            self.writer.add_scalar(key, value, global_step=step)
        for key, value in texts.items():
            if self.texts.get(key) != value:
                self.writer.add_text(key, value, global_step=step)
                self.texts[key] = value
        self.writer.flush()  # live in TensorBoard, and a full disk shows up here

    def close(self):
        self.writer.close()


class _MLflow(_Backend):
    name = "mlflow"

    def __init__(self, folder: Path, config: dict, run_name: str):
        # Telemetry off before the import: the store is a local folder, nothing else may leave.
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        os.environ["DO_NOT_TRACK"] = "true"
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        folder.mkdir(parents=True, exist_ok=True)
        self.Metric = Metric
        self.client = MlflowClient(tracking_uri=folder.resolve().as_uri())
        experiment = self.client.get_experiment_by_name("rlhf")
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment("rlhf"))
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:_MLFLOW_PARAM_CHARS])
                  for k, v in sorted(config.items())]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, numbers, texts, step):
        import time

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.Metric(k, v, now, step)
                                                    for k, v in numbers.items()])
        for key, value in texts.items():
            self.client.set_tag(self.run_id, key, value)

    def close(self):
        self.client.set_terminated(self.run_id)


class _WandB(_Backend):
    name = "wandb"

    def __init__(self, log_dir: Path, config: dict, run_name: str):
        os.environ["WANDB_MODE"] = "offline"  # also for any wandb.init elsewhere in the process
        import wandb

        log_dir.mkdir(parents=True, exist_ok=True)
        # dir=log_dir: wandb writes its run under log_dir/wandb.
        self.run = wandb.init(dir=str(log_dir), mode="offline", project="rlhf", name=run_name,
                              config=config)

    def log(self, numbers, texts, step):
        self.run.log(numbers, step=step)
        for key, value in texts.items():
            self.run.summary[key] = value

    def close(self):
        self.run.finish()


class Tracker:
    """Where a run's figures go besides metrics.jsonl: `log(metrics, step)` per step, `close()`
    at the end (or use it as a context manager). With no backends (report_to none) it does
    nothing and writes nothing."""

    def __init__(self, backends: Sequence[_Backend] = ()):
        self._backends = list(backends)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self._backends]

    def log(self, metrics: dict, step: int) -> None:
        if not self._backends:
            return
        numbers, texts = split_figures(metrics)
        for backend in list(self._backends):
            self._guard(backend, backend.log, numbers, texts, step)

    def close(self) -> None:
        for backend in list(self._backends):
            self._guard(backend, backend.close)
        self._backends.clear()

    def _guard(self, backend: _Backend, call, *args) -> None:
        # Training is worth more than its charts: a failing tracker warns once and is dropped.
        try:
            call(*args)
        except Exception as exc:  # noqa: BLE001 - any tracker error, the run goes on
            log.warning("experiment tracking to %s failed (%s: %s); it stops for this run, "
                        "training goes on", backend.name, type(exc).__name__, exc)
            if backend in self._backends:
                self._backends.remove(backend)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def open_tracker(report_to: str | Sequence[str], log_dir: Path, config: dict, *,
                 start_step: int = 1, run_name: str | None = None) -> Tracker:
    """A Tracker for `report_to` writing under `log_dir`, with `config` (secrets removed) logged
    once. `start_step`: the first step this process logs (a resumed run's TensorBoard events
    from that step on are superseded). Raises ValueError for an unknown tracker or a missing
    package (settings validation catches both earlier), and the tracker's own error when it
    cannot start."""
    names = [n for n in parse_report_to(report_to).split(",") if n != "none"]
    if not names:
        return Tracker()
    log_dir = Path(log_dir)
    config = redact(config)
    run_name = run_name or log_dir.resolve().name
    opened: list[_Backend] = []
    try:
        for name in names:
            folder = log_dir / TRACKERS[name][2]
            if name == "tensorboard":
                opened.append(_TensorBoard(folder, config, start_step))
            elif name == "mlflow":
                opened.append(_MLflow(folder, config, run_name))
            else:
                opened.append(_WandB(log_dir, config, run_name))
    except BaseException:
        Tracker(opened).close()
        raise
    return Tracker(opened)


"""The run dir of a stack and the I/O around its plan: the stack config is read, the model folder
checked, the policy's and the trainer's admin tokens made once per run dir, and the folders and
files the plan lists written before anything starts."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rlhf.files import atomic_write
from rlhf.paths import default_model_dir, rlhf_home
from rlhf.stack.plan import (
    PlanError,
    StackPlan,
    UpOptions,
    build_plan,
    check_sections,
    merge_sections,
    planned_model,
)

ADMIN_TOKEN_FILE = "admin-token"  # the policy's: adapter pushes
TRAINER_TOKEN_FILE = "trainer-token"  # the trainer's: StartRun, StopRun and reads


def default_run_dir(kind: str = "up") -> Path:
    return rlhf_home() / "stacks" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def read_stack_config(path: Path | None) -> dict[str, dict]:
    """The stack YAML: `{policy: {...}, reward: {...}, trainer: {...}, gateway: {...}}`, each
    section the keys of that service's own config file."""
    if path is None:
        return {}
    from rlhf.plumbing.config import read_yaml_mapping

    return check_sections(read_yaml_mapping(path, "stack config"), str(path))


def admin_token(run_dir: Path, name: str = ADMIN_TOKEN_FILE) -> str:
    """An admin token of this run dir (the policy's by default, so pushes come only from this
    stack's trainer), made once; the file is private from its first byte."""
    path = run_dir / name
    if not path.exists():
        atomic_write(path, secrets.token_urlsafe(24), mode=0o600)
    return path.read_text().strip()


def trainer_token(run_dir: Path) -> str:
    """The trainer's admin token of this run dir: what `rlhf demo` and TrainerClient send."""
    return admin_token(run_dir, TRAINER_TOKEN_FILE)


def prepare(opts: UpOptions) -> StackPlan:
    """Plans the stack of `opts` and writes what the plan needs on disk."""
    opts = replace(opts, run_dir=opts.run_dir.resolve(),
                   prompts=Path(opts.prompts).resolve() if opts.prompts else None)
    sections = merge_sections(read_stack_config(opts.config), opts.overrides)
    model = planned_model(opts, sections, default_model_dir()).expanduser().resolve()
    if not (model / "config.json").exists():
        hint = " (run `rlhf model prepare`)" if opts.model is None else ""
        raise PlanError(f"model folder {model} not found or has no config.json{hint}")
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    token = admin_token(opts.run_dir)
    # vLLM's IPC sockets need a short path (a Unix socket path has at most 107 bytes), so they
    # go under /tmp rather than the run dir; the supervisor removes the folder when it stops.
    ipc_root = Path(tempfile.mkdtemp(prefix="rlhf-up-"))
    try:
        plan = build_plan(opts, sections, model, token, ipc_root,
                          trainer_token=trainer_token(opts.run_dir))
        write_plan(plan)
    except BaseException:
        shutil.rmtree(ipc_root, ignore_errors=True)
        raise
    return plan


def write_plan(plan: StackPlan) -> None:
    for folder in plan.dirs:
        folder.mkdir(parents=True, exist_ok=True)
    for path, text in plan.files.items():
        atomic_write(path, text)

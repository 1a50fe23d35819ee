"""Where the project keeps what it writes outside the repo: `RLHF_HOME` and the default model."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def rlhf_home() -> Path:
    """Data dir for everything the project writes outside the repo (`RLHF_HOME` overrides)."""
    env = os.environ.get("RLHF_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "rlhf-grpc"


def default_model_dir() -> Path:
    return rlhf_home() / "models" / DEFAULT_MODEL_NAME

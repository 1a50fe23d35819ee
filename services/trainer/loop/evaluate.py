"""Pairwise accuracy of a reward-model folder on preference pairs: the share of pairs whose chosen
answer it scores strictly higher. Reads the text as the reward service does (the folder's
`rlhf_reward.json` format, cut from the left to its max_tokens)."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.formats import ADAPTER_CONFIG_FILE, rm_default_format, rm_read_meta
from services.trainer.rl_math import pairwise_accuracy
from services.trainer.rm.model import encode


class PairScorer:
    """A reward model folder (full model, or LoRA adapter merged at load) on the CPU or GPU."""

    def __init__(self, folder: Path, device: str = "cpu", batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        meta = rm_read_meta(folder)
        if (folder / ADAPTER_CONFIG_FILE).exists():
            from peft import PeftModel

            config = json.loads((folder / ADAPTER_CONFIG_FILE).read_text())
            base = meta.get("backbone") or config["base_model_name_or_path"]
            model = AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=int(meta.get("num_labels", 1)), dtype=torch.float32)
            model = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(folder),
                                                                       dtype=torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.format = meta.get("format") or rm_default_format(self.tokenizer)
        self.max_tokens = int(meta.get("max_tokens", 512))

    def rewards(self, prompts: list[str], responses: list[str]):
        import torch

        out = []
        with torch.inference_mode():
            for k in range(0, len(prompts), self.batch_size):
                batch = encode(self.tokenizer, self.format, prompts[k:k + self.batch_size],
                               responses[k:k + self.batch_size], self.max_tokens)
                batch = {name: t.to(self.device) for name, t in batch.items()}
                out.append(self.model(**batch).logits.float()[:, 0].cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def accuracy(self, pairs: list[dict]) -> float | None:
        """Share of pairs ranked right (None for no pairs)."""
        if not pairs:
            return None
        prompts = [p["prompt"] for p in pairs]
        chosen = self.rewards(prompts, [p["chosen"] for p in pairs])
        rejected = self.rewards(prompts, [p["rejected"] for p in pairs])
        return pairwise_accuracy(chosen, rejected)


def accuracies(folder: Path, sets: dict[str, list[dict]], device: str = "cpu"
               ) -> dict[str, float | None]:
    """{name: accuracy of `folder` on that set of pairs}; the model is loaded once."""
    scorer = PairScorer(folder, device)
    return {name: scorer.accuracy(pairs) for name, pairs in sets.items()}

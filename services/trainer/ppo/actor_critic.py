"""The trained model: one HF base with two LoRA adapters, "policy" and (for PPO) "critic" with a
value head, and the reference = the same base with adapters off (DESIGN.md decision 4: no second
copy of the weights).

Sequences are laid out as [left-padded prompt | right-padded completion], so position P-1+t
predicts completion token t for every row (P = padded prompt width).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf.files import atomic_dir
from services.trainer.rl_math import entropy_from_logits, logprobs_from_logits


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, P+T]
    attention_mask: torch.Tensor  # [B, P+T]
    position_ids: torch.Tensor    # [B, P+T]
    response_mask: torch.Tensor   # [B, T] float, 1 on real completion tokens
    completion_ids: torch.Tensor  # [B, T]
    prompt_width: int             # P

    def rows(self, idx: torch.Tensor) -> Batch:
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                     self.response_mask[idx], self.completion_ids[idx], self.prompt_width)


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Batch:
    width = max(len(p) for p in prompts)
    length = max(1, max(len(c) for c in completions))
    ids, attn, resp, comp = [], [], [], []
    for p, c in zip(prompts, completions, strict=True):
        left = width - len(p)
        right = length - len(c)
        ids.append([pad_id] * left + p + c + [pad_id] * right)
        attn.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        resp.append([1.0] * len(c) + [0.0] * right)
        comp.append(c + [pad_id] * right)
    attention = torch.tensor(attn)
    # Left padding must not shift positions: count only real tokens.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return Batch(torch.tensor(ids), attention, positions, torch.tensor(resp), torch.tensor(comp),
                 width)


class ActorCritic(nn.Module):
    def __init__(self, model_dir: Path, *, lora_rank: int, lora_alpha: float,
                 target_modules: list[str], with_critic: bool, init_adapter: Path | None = None,
                 compute_dtype: str = "float32"):
        super().__init__()
        # Weights, optimizer state and losses stay float32; bfloat16 only runs the matmuls
        # (autocast), which is what the time goes into.
        self.autocast = {"float32": None, "bfloat16": torch.bfloat16}[compute_dtype]
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(target_modules),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        if init_adapter is not None:
            self.model = PeftModel.from_pretrained(base, str(init_adapter), adapter_name="policy",
                                                   is_trainable=True)
        else:
            self.model = get_peft_model(base, lora, adapter_name="policy")
        self.with_critic = with_critic
        if with_critic:
            self.model.add_adapter("critic", lora)
            hidden = base.config.hidden_size
            self.value_head = nn.Linear(hidden, 1)
            # V = 0 at the start: a random critic's noise would swamp the first advantages
            # (rewards arrive only at the last token), while zero gives plain returns.
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)
        self.model.set_adapter("policy")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ parameters

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if f".{name}." in n and "lora_" in n]

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = self.adapter_parameters("policy")
        if self.with_critic:
            params += self.adapter_parameters("critic") + list(self.value_head.parameters())
        return params

    def _use(self, adapter: str) -> None:
        self.model.set_adapter(adapter)
        # peft freezes the inactive adapter on set_adapter; both stay trainable here because
        # policy and critic steps alternate with one optimizer.
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    # ------------------------------------------------------------------ forward passes

    def _forward(self, batch: Batch, hidden: bool = False):
        with torch.autocast("cpu", dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, output_hidden_states=hidden,
                              use_cache=False)

    def _response_slice(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        t = batch.completion_ids.shape[1]
        return x[:, batch.prompt_width - 1: batch.prompt_width - 1 + t]

    def policy_logprobs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [B,T], entropy [B,T]) of the completion tokens under the policy adapter."""
        self._use("policy")
        logits = self._response_slice(self._forward(batch).logits, batch).float()
        return logprobs_from_logits(logits, batch.completion_ids), entropy_from_logits(logits)

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        try:
            with torch.no_grad(), self.model.disable_adapter():
                logits = self._response_slice(self._forward(batch).logits, batch).float()
                return logprobs_from_logits(logits, batch.completion_ids)
        finally:
            # Leaving disable_adapter re-activates the policy adapter the peft way, which
            # freezes the critic's: a critic graph built before would then get no gradients.
            self._use("policy")

    def values(self, batch: Batch) -> torch.Tensor:
        """V(s_t) [B,T]: the critic's estimate before completion token t is chosen."""
        self._use("critic")
        try:
            hidden = self._forward(batch, hidden=True).hidden_states[-1]
            return self.value_head(self._response_slice(hidden, batch).float()).squeeze(-1)
        finally:
            self._use("policy")

    # ------------------------------------------------------------------ saving

    def save_policy_adapter(self, out: Path) -> Path:
        """A plain peft folder (adapter_config.json + adapter_model.safetensors) of the policy
        adapter alone, as PushAdapter and PeftModel.from_pretrained expect."""
        with atomic_dir(out) as tmp:
            self.model.save_pretrained(str(tmp), selected_adapters=["policy"])
            nested = tmp / "policy"  # peft nests non-default adapter names
            if nested.is_dir():
                for f in nested.iterdir():
                    f.rename(tmp / f.name)
                nested.rmdir()
        return out

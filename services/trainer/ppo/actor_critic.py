"""The trained model: one HF base with two LoRA adapters, "policy" and (for PPO) "critic" with a
value head, and the reference = the same base with adapters off (DESIGN.md decision 4: no second
copy of the weights).

Sequences are laid out as [left-padded prompt | right-padded completion], so position P-1+t
predicts completion token t for every row (P = padded prompt width).

The model lives on one device (`device`). On CUDA the frozen base weights are stored in the
compute dtype (bfloat16 by default): they never change, so this loses nothing the training keeps,
halves their memory and spares re-casting them in every pass; the LoRA weights and the value head
stay float32, and so do the optimizer state and the losses. `shard_base` splits the frozen base
across the ranks of a run with PyTorch FSDP2 (`fully_shard`), the trainable weights left whole.
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
        idx = idx.to(self.input_ids.device)
        return Batch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx],
                     self.response_mask[idx], self.completion_ids[idx], self.prompt_width)

    def to(self, device: torch.device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device),
                     self.position_ids.to(device), self.response_mask.to(device),
                     self.completion_ids.to(device), self.prompt_width)


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


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA, float32 on the CPU."""
    if compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[compute_dtype]


class ActorCritic(nn.Module):
    def __init__(self, model_dir: Path, *, lora_rank: int, lora_alpha: float,
                 target_modules: list[str], with_critic: bool, init_adapter: Path | None = None,
                 compute_dtype: str = "float32", device: str | torch.device = "cpu",
                 gradient_checkpointing: bool = False, shard_base: bool = False):
        super().__init__()
        self.device = torch.device(device)
        dtype = resolve_compute_dtype(compute_dtype, self.device)
        # bfloat16 only runs the matmuls (autocast), which is what the time goes into.
        self.autocast = None if dtype == torch.float32 else dtype
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        stored = dtype if self.device.type == "cuda" else torch.float32
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=stored)
        lora = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, target_modules=list(target_modules),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        # peft keeps adapters float32 over a bfloat16 base (autocast_adapter_dtype).
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
        for p in self.trainable_parameters():  # float32 whatever the base's dtype
            p.data = p.data.float()
        if gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad (the embeddings are
            # frozen); transformers checkpoints only in training mode, which changes nothing
            # else here (no dropout: LoRA dropout 0, the attention's 0).
            base.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.train()
        self.sharded = False
        if shard_base:
            self.sharded = self._shard_base()
        if not self.sharded:
            self.to(self.device)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id

    def _shard_base(self) -> bool:
        """FSDP2 over the ranks of the process group: each decoder layer, then the rest of the
        base, is sharded; the trainable weights are left out (`ignored_params`), so they stay
        plain tensors on every rank and the data-parallel all-reduce of their gradients stays
        the one of World.backward. Every forward pass then gathers the layers' weights, so all
        ranks must run the same passes (Update runs them in lockstep). False with one rank."""
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return False
        trainable = self.trainable_parameters()
        for p in trainable:  # fully_shard leaves ignored parameters where they are
            p.data = p.data.to(self.device)
        if self.with_critic:
            self.value_head.to(self.device)
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        ignored = set(trainable)
        causal_lm = self.model.get_base_model()
        for layer in causal_lm.get_decoder().layers:
            fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(causal_lm, mesh=mesh, ignored_params=ignored)
        return True

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

    def _forward(self, batch: Batch, logits_to_keep: int):
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16,
                            enabled=self.autocast is not None):
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, logits_to_keep=logits_to_keep,
                              use_cache=False)

    def _completion_logits(self, batch: Batch) -> torch.Tensor:
        """[B, T, V] float32: the logits at positions P-1 .. P+T-2, which predict the completion
        tokens. Only the last T+1 positions go through the LM head, not the prompt's."""
        t = batch.completion_ids.shape[1]
        return self._forward(batch, t + 1).logits[:, :t].float()

    def policy_logprobs(self, batch: Batch, entropy: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logp [B,T], entropy [B,T] or None) of the completion tokens under the policy adapter.
        The entropy is a figure, never differentiated: computed without a graph."""
        self._use("policy")
        logits = self._completion_logits(batch)
        logp = logprobs_from_logits(logits, batch.completion_ids)
        if not entropy:
            return logp, None
        with torch.no_grad():
            return logp, entropy_from_logits(logits.detach())

    def reference_logprobs(self, batch: Batch) -> torch.Tensor:
        active = self.model.active_adapter
        try:
            with torch.no_grad(), self.model.disable_adapter():
                logits = self._completion_logits(batch)
                return logprobs_from_logits(logits, batch.completion_ids)
        finally:
            # Leaving disable_adapter re-activates the adapter the peft way, which freezes the
            # other one: a critic graph built before would then get no gradients.
            self._use(active)

    def values(self, batch: Batch) -> torch.Tensor:
        """V(s_t) [B,T]: the critic's estimate before completion token t is chosen. The critic
        adapter stays active after it: with gradient checkpointing the backward pass runs the
        layers again, and they must run with the adapter of the forward pass."""
        self._use("critic")
        # The final norm's output is the hidden state the value head reads: hooked, so the
        # value pass needs neither every layer's hidden states nor the logits.
        captured: list[torch.Tensor] = []
        norm = _final_norm(self.model.get_base_model())
        hook = norm.register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            self._forward(batch, 1)
            hidden = captured[-1]
            t = batch.completion_ids.shape[1]
            rows = hidden[:, batch.prompt_width - 1: batch.prompt_width - 1 + t]
            return self.value_head(rows.float()).squeeze(-1)
        finally:
            hook.remove()

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


def _final_norm(causal_lm: nn.Module) -> nn.Module:
    """The decoder's final norm, whose output is the last hidden state (Llama, Qwen, Mistral,
    ... name it `norm`)."""
    norm = getattr(causal_lm.get_decoder(), "norm", None)
    if norm is None:
        raise ValueError(f"{type(causal_lm).__name__}: no final `norm` in its decoder to read "
                         "the critic's hidden states from")
    return norm

"""The learner's update on a GPU: tokens/s, seconds per step by phase, peak memory and MFU of PPO
and GRPO with LoRA r=16 in bf16, on random-weight Llama models built here (no model files, no
network, no vLLM: only torch, transformers, peft and the repo's services.trainer code).

    python bench/gpu_learner.py [--size 0.5b,1.5b] [--algo ppo,grpo] [--device auto]
        [--sequences 64 --prompt-tokens 128 --completion-tokens 384] [--steps 3 --warmup 1]

Each step is the learner's own `Update` on a synthetic global batch: `--sequences` rows in
groups of 4 (one prompt, 4 completions), random token ids, completion lengths drawn uniformly
from [completion/2, completion] (rollouts end at different lengths), random scores and behaviour
logprobs. The sizes have Qwen2.5's shapes in Llama form (tied embeddings, vocab 151936):
0.5b = 24 layers x 896, 1.5b = 28 layers x 1536; `tiny` is the test model's shape, for a CPU run
in seconds (`--device cpu --size tiny`).

Phases: `old` (policy logprobs without gradients), `ref` (adapters off), `value` (critic, PPO
only) and `update` (the minibatch forward/backward passes and optimizer steps: the rest of the
step); `passes_per_step` is the learner's own count (`passes/<kind>`, 1.0 = every row once).
MFU counts model FLOPs, not the hardware's: 6*N per trained token (forward + backward), 2*N per
token of a no-grad forward, over the GPU's bf16 dense peak (--peak-tflops; H100/H200 989).
N*tokens is the body's matmul parameters times the real (unpadded) tokens plus the LM head's
times the completion tokens (the learner computes logits only there, and none in a value pass);
attention scores and recomputation under gradient checkpointing are left out. With a frozen base
the weight gradients of N are never computed, so the FLOPs actually done are 4*N per trained
token: `mfu_4n`.

On a machine whose Python lacks some of the repo's own dependencies (pydantic, grpcio...), the
script names what is missing; bench/README.md says how to bring them as wheels.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import _common as C

# Llama fields of each size; vocab and tied embeddings as in Qwen2.5 (the tokenizer is the
# tiny model's: only its pad id matters here, token ids are drawn over the whole vocab).
SIZES = {
    "tiny": None,  # rlhf.models.tiny.ARCH, vocab 512
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                 vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                 vocab_size=151936, tie_word_embeddings=True),
}
GROUP = 4  # completions per prompt (GRPO's group)
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
PHASES = ("old", "ref", "value", "update")


def require_modules() -> None:
    """Import the learner's modules, or say which package is missing (a bare GPU image)."""
    # The settings first: they need no torch, so a machine without the repo's packages hears
    # of it in a second.
    for name in ("services.trainer.ppo.settings", "torch", "transformers", "peft",
                 "services.trainer.ppo.update"):
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise SystemExit(f"missing Python package {exc.name!r} (needed by {name}); see "
                             "bench/README.md for bringing wheels to a machine without network"
                             ) from None


def build_model(size: str, out: Path, device, seed: int = 0) -> tuple[Path, dict]:
    """A random Llama of `size` saved (bf16, or fp32 for tiny) to `out`; returns (out, its
    parameter counts: all, and the matmul ones of the body and of the LM head)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models import tiny

    tokenizer = tiny.build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tiny.SPECIAL_TOKENS}
    fields = dict(tiny.ARCH, vocab_size=len(tokenizer)) if size == "tiny" else dict(
        tiny.ARCH, max_position_embeddings=4096, initializer_range=0.02, **SIZES[size])
    config = LlamaConfig(bos_token_id=ids[tiny.IM_START], eos_token_id=ids[tiny.IM_END],
                         pad_token_id=ids[tiny.IM_END], **fields)
    dtype = torch.float32 if size == "tiny" else torch.bfloat16
    torch.manual_seed(seed)
    # Initialising on the GPU takes seconds where the CPU takes minutes at 1.5B.
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    head = model.get_output_embeddings().weight.numel()
    counts = {"params": sum(p.numel() for p in model.parameters()), "lm_head_params": head,
              "body_params": sum(m.weight.numel() for m in model.modules()
                                 if isinstance(m, torch.nn.Linear)) - head}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, counts


def synthetic_samples(n: int, prompt_tokens: int, completion_tokens: int, vocab: int, pad: int,
                      rng) -> list:
    """n rollouts in groups of GROUP sharing a prompt; completion lengths uniform in
    [completion/2, completion]; no pad token inside a sequence."""
    from services.trainer.clients import Sample

    def tokens(k: int) -> list[int]:
        out = rng.integers(0, vocab - 1, size=k)
        return [int(t) + int(t >= pad) for t in out]  # skip the pad id

    samples = []
    for i in range(n):
        if i % GROUP == 0:
            prompt = tokens(prompt_tokens)
        length = int(rng.integers(max(1, completion_tokens // 2), completion_tokens + 1))
        samples.append(Sample(
            prompt_index=i // GROUP, prompt_ids=prompt, completion_ids=tokens(length),
            completion_text="", adapter_version=1, score=float(rng.normal()),
            behaviour_logprobs=[-float(x) for x in rng.exponential(2.0, size=length)]))
    return samples


class PassTimer:
    """Wraps the model's forward-pass methods: seconds of the no-grad passes by kind (old, ref,
    value), and the model FLOPs of every pass, those that train (forward + backward) apart."""

    def __init__(self, model, sync, body: int, head: int):
        self.sync, self.body, self.head = sync, body, head
        self.reset()
        for method, kind in (("policy_logprobs", "old"), ("reference_logprobs", "ref"),
                             ("values", "value")):
            setattr(model, method, self._wrap(getattr(model, method), kind))

    def reset(self) -> None:
        self.seconds = dict.fromkeys(PHASES[:3], 0.0)
        self.forward_flops = 0.0  # 2 * parameters * tokens of every pass, training ones too
        self.train_forward_flops = 0.0  # the part of it whose backward pass also runs

    def _wrap(self, fn, kind: str):
        import torch

        def timed(batch, *args, **kwargs):
            # The body runs on every real token; the LM head only on the completion's (the
            # logprob passes), never in the value pass (it reads the hidden states).
            flops = 2 * self.body * float(batch.attention_mask.sum())
            if kind != "value":
                flops += 2 * self.head * float(batch.response_mask.sum())
            self.forward_flops += flops
            if torch.is_grad_enabled() and kind != "ref":
                self.train_forward_flops += flops
                return fn(batch, *args, **kwargs)
            self.sync()
            start = time.perf_counter()
            out = fn(batch, *args, **kwargs)
            self.sync()
            self.seconds[kind] += time.perf_counter() - start
            return out

        return timed


def run_algo(args, algo: str, model_dir: Path, counts: dict, device, peak: float | None,
             rng) -> dict:
    import torch

    from services.trainer import rl_math
    from services.trainer.distributed import World
    from services.trainer.ppo.actor_critic import ActorCritic
    from services.trainer.ppo.settings import PPOSettings
    from services.trainer.ppo.update import Update

    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    settings = PPOSettings.load(
        None, algo=algo, model=model_dir, samples_per_prompt=GROUP, lora_rank=16,
        lora_alpha=32.0, ppo_epochs=args.epochs, minibatch_size=args.minibatch,
        micro_batch_size=args.micro_batch, gradient_checkpointing=args.grad_ckpt,
        kl_coef=args.kl_coef, device=str(device), compute_dtype=args.dtype)
    if cuda:
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    start = time.perf_counter()
    model = ActorCritic(
        model_dir, lora_rank=settings.lora_rank, lora_alpha=settings.lora_alpha,
        target_modules=settings.target_modules, with_critic=algo == "ppo",
        compute_dtype=settings.compute_dtype, device=device,
        gradient_checkpointing=settings.gradient_checkpointing)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=settings.learning_rate)
    update = Update(settings, model, optimizer, rl_math.FixedKLController(settings.kl_coef),
                    World())
    load_seconds = time.perf_counter() - start
    vocab = model.model.get_input_embeddings().weight.shape[0]
    timer = PassTimer(model, sync, counts["body_params"], counts["lm_head_params"])
    tokens = seconds = peak_mem = 0.0
    passes: dict[str, float] = {}
    for step in range(args.warmup + args.steps):
        samples = synthetic_samples(args.sequences, args.prompt_tokens, args.completion_tokens,
                                    vocab, model.pad_id, rng)
        if step == args.warmup:  # the timed steps start here
            timer.reset()
            tokens = seconds = peak_mem = 0.0
            passes = {}
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        begin = time.perf_counter()
        figures = update(samples)
        sync()
        seconds += time.perf_counter() - begin
        tokens += sum(len(x.prompt_ids) + len(x.completion_ids) for x in samples)
        for key, value in figures.items():
            if key.startswith("passes/"):
                passes[key[7:]] = passes.get(key[7:], 0.0) + value / args.steps
        # CUDA: the most allocated at once; CPU: the process's peak resident set (KiB on
        # Linux), model building included.
        peak_mem = max(peak_mem, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    steps = args.steps
    per_step = {k: v / steps for k, v in timer.seconds.items()}
    per_step["update"] = seconds / steps - sum(per_step.values())
    # A backward pass costs twice its forward (gradients of the activations and of the
    # weights); with the base frozen only the first is computed: the 4N reading.
    flops = timer.forward_flops + 2 * timer.train_forward_flops
    flops_4n = timer.forward_flops + timer.train_forward_flops
    achieved = flops / seconds
    result = {
        "algo": algo,
        "seconds_per_step": round(seconds / steps, 4),
        **{f"{k}_seconds": round(v, 4) for k, v in per_step.items()},
        "passes_per_step": {k: round(v, 3) for k, v in passes.items()},
        "tokens_per_step": tokens / steps,
        "tokens_per_s": round(tokens / seconds, 1),
        "tflops": round(achieved / 1e12, 3),
        "mfu": round(achieved / (peak * 1e12), 4) if peak else None,
        "mfu_4n": round(flops_4n / seconds / (peak * 1e12), 4) if peak else None,
        "peak_memory_gib": round(peak_mem, 3),
        "load_seconds": round(load_seconds, 2),
    }
    del update, optimizer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def peak_tflops(args, device) -> float | None:
    import torch

    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main(args) -> None:
    require_modules()
    import numpy as np
    import torch

    from rlhf.plumbing.config import ConfigError
    from services.trainer.distributed import resolve_device

    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    peak = peak_tflops(args, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    work = Path(tempfile.mkdtemp(prefix="gpu-learner-", dir=args.workdir))
    rows = []
    try:
        for size in args.size.split(","):
            model_dir, counts = build_model(size, work / size, device)
            print(f"== {size}: {counts['params'] / 1e6:.1f}M parameters, matmul: body "
                  f"{counts['body_params'] / 1e6:.1f}M, LM head "
                  f"{counts['lm_head_params'] / 1e6:.1f}M; {args.sequences} sequences of "
                  f"{args.prompt_tokens} prompt + "
                  f"{args.completion_tokens // 2}..{args.completion_tokens} completion tokens; "
                  f"{device} ({gpu})", flush=True)
            rng = np.random.default_rng(args.seed)
            for algo in args.algo.split(","):
                row = {"size": size, **counts,
                       **run_algo(args, algo, model_dir, counts, device, peak, rng)}
                rows.append(row)
                mfu = f"{row['mfu']:.1%} (4N: {row['mfu_4n']:.1%})" if peak else "n/a"
                phases = ", ".join(f"{p} {row[f'{p}_seconds']:.3f}" for p in PHASES)
                print(f"{size} {algo:4s}: {row['seconds_per_step']:.3f} s/step ({phases}), "
                      f"{row['tokens_per_s']:.0f} tokens/s, {row['tflops']:.1f} TFLOP/s, "
                      f"MFU {mfu}, peak memory {row['peak_memory_gib']:.2f} GiB, "
                      f"passes {row['passes_per_step']}", flush=True)
            shutil.rmtree(model_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"MFU = (6*N*trained tokens + 2*N*no-grad forward tokens) / seconds / peak, peak "
          f"{peak or 'unknown'} TFLOP/s bf16 dense, N*tokens = body matmul parameters * real "
          "(unpadded) tokens + LM head parameters * completion tokens (none in value passes); "
          "mfu_4n counts 4*N per trained token (LoRA: no weight gradients of the base)")
    C.report("gpu_learner", {
        "device": str(device), "gpu": gpu, "peak_tflops": peak, "dtype": args.dtype,
        "sequences": args.sequences, "prompt_tokens": args.prompt_tokens,
        "completion_tokens": args.completion_tokens, "minibatch": args.minibatch,
        "micro_batch": args.micro_batch, "epochs": args.epochs, "kl_coef": args.kl_coef,
        "gradient_checkpointing": args.grad_ckpt, "steps": args.steps, "lora_rank": 16,
        "results": rows,
    })


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="0.5b,1.5b",
                        help=f"Comma list of {', '.join(SIZES)}")
    parser.add_argument("--algo", default="ppo,grpo", help="Comma list of ppo, grpo, rloo")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="The learner's compute dtype (auto: bfloat16 on CUDA)")
    parser.add_argument("--sequences", type=int, default=64,
                        help=f"Rollouts per step (groups of {GROUP})")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--completion-tokens", type=int, default=384,
                        help="Longest completion; lengths are uniform in [half, this]")
    parser.add_argument("--minibatch", type=int, default=16, help="Sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="Sequences per forward/backward (default: the minibatch)")
    parser.add_argument("--epochs", type=int, default=1, help="ppo_epochs")
    parser.add_argument("--kl-coef", type=float, default=0.05,
                        help="0 skips the reference pass")
    parser.add_argument("--grad-ckpt", action="store_true", help="Gradient checkpointing")
    parser.add_argument("--steps", type=int, default=3, help="Timed steps per algorithm")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed steps first")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="The device's bf16 dense peak (default: by GPU name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="Where the models are written")
    args = parser.parse_args(argv)
    unknown = set(args.size.split(",")) - set(SIZES)
    if unknown:
        parser.error(f"unknown size(s) {', '.join(sorted(unknown))}")
    if args.sequences % GROUP:
        parser.error(f"--sequences must be a multiple of {GROUP}")
    return args


if __name__ == "__main__":
    sys.exit(main(parse_args()))

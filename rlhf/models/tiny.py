"""A tiny random Llama with a locally trained tokenizer, for tests (DESIGN.md decision 7).

It has the shape of the default model where that matters to the code under test (Llama
architecture, ChatML template, the same special tokens and ids, eos = `<|im_end|>`), and is
small enough to build in about a second and to run in vLLM on a laptop CPU.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from rlhf.files import atomic_dir

MARKER = "rlhf_tiny.json"
DEFAULT_VOCAB_SIZE = 512

# Same order as SmolLM2, so ids 0/1/2 mean the same thing in tests as in production.
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# Byte-level BPE needs all 256 bytes plus the special tokens before any merge.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# ChatML, as SmolLM2 uses, minus its default system prompt (tests want short prompts).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# head_dim 64 as in SmolLM2-135M. vLLM's CPU attention backend only takes head sizes
# 32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512 (CPUAttentionBackend.get_supported_head_sizes).
ARCH = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    # Wider than Llama's 0.02 so random logits have clear top-1 margins: greedy decoding then
    # agrees between HF and vLLM despite their different (fp32) summation orders.
    initializer_range=0.05,
)

_SEED_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model learns to answer short questions.
Hello! How are you today? I am fine, thank you. What is your name? My name is Tiny.
The capital of France is Paris. The sun is a star, and the moon goes around the earth.
Please write a short poem about the sea. The waves are blue and the wind is cold.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Symbols: , . ; : ! ? ' " ( ) [ ] { } - + = / * % & #
def add(a, b):
    return a + b
"""

_SUBJECTS = (
    "the cat|a dog|my friend|the teacher|our team|the robot|a bird|the model|this user"
    "|the assistant|a child|the farmer|she|he|we"
).split("|")
_VERBS = "likes sees finds writes reads builds helps answers makes takes gives wants knows".split()
_OBJECTS = (
    "a red apple|the long story|an old book|the next question|good music|a small house"
    "|the green garden|warm bread|the right answer|a new song|the river|some water|the old city"
    "|a simple plan|the morning light"
).split("|")
_TAILS = (
    "today|every day|in the morning|at night|with care|very quickly|because it is useful"
    "|after the rain|before dinner|on the weekend"
).split("|")


def training_corpus() -> list[str]:
    """Built-in English text for the tokenizer: fixed, so every tiny model shares one vocab."""
    rng = random.Random(1234)
    lines = _SEED_TEXT.splitlines()
    for _ in range(2000):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.5:
            sentence += f" {rng.choice(_TAILS)}"
        lines.append(sentence[0].upper() + sentence[1:] + rng.choice([".", "!", "?"]))
    for role in ("system", "user", "assistant"):
        lines.append(f"{IM_START}{role}\nHello there.{IM_END}")
    return lines


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE on the built-in corpus; exactly `vocab_size` entries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    # The corpus may run out of merges before vocab_size; filler tokens keep
    # len(tokenizer) == config.vocab_size, which vLLM and our logprob code rely on.
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|reserved_{i}|>" for i in range(missing)])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=IM_START,
        eos_token=IM_END,
        pad_token=IM_END,
        unk_token=ENDOFTEXT,
        model_max_length=ARCH["max_position_embeddings"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(out_dir: Path, seed: int = 0, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Write a random tiny Llama (fp32 safetensors) with tokenizer and chat template to `out_dir`.

    Same seed, same weights (byte for byte); the tokenizer does not depend on the seed.
    An existing `out_dir` is replaced as a whole.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = build_tokenizer(vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=ids[IM_START],
        eos_token_id=ids[IM_END],
        pad_token_id=ids[IM_END],
        dtype="float32",
        **ARCH,
    )
    # fork_rng: a test calling this must not have its own random stream moved.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )

    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "kind": "tiny-random-llama",
                    "seed": seed,
                    "vocab_size": len(tokenizer),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=2,
            )
        )
    return out

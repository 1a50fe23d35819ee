"""services/trainer/sft/: packing and loss masking as pure functions, then a real LoRA run on the
tiny model (loss falls, greedy output moves to the taught pattern, the folder loads as a
trainable peft adapter) and the `sft` command."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from services.trainer.data import DataError, SFTRecord
from services.trainer.sft.cli import train_sft
from services.trainer.sft.examples import (
    Example,
    collate,
    encode_example,
    make_rows,
    pack,
    sft_loss,
)
from services.trainer.sft.settings import SFTSettings
from services.trainer.sft.train import METRICS_FILE, run_sft

PATTERN = "red green blue red green blue red green blue"
PROMPTS = ["Say the colors.", "What comes next?", "Tell me a pattern.", "Hello there.",
           "Please answer.", "Go on."]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


def test_pack_keeps_every_token_once_and_the_mask_aligned():
    g = torch.Generator().manual_seed(0)
    examples = []
    for i, n in enumerate([3, 7, 1, 12, 5, 4]):
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        mask = torch.randint(0, 2, (n,), generator=g).tolist()
        examples.append(Example([1000 + i] + ids, [0] + mask))  # a marker token per example
    blocks = pack(examples, block_size=5)
    total = sum(len(e.input_ids) for e in examples)
    assert [len(b.input_ids) for b in blocks] == [5] * (total // 5) + [total % 5]
    assert all(len(b.input_ids) == len(b.loss_mask) for b in blocks)
    flat_ids = [t for b in blocks for t in b.input_ids]
    flat_mask = [m for b in blocks for m in b.loss_mask]
    assert flat_ids == [t for e in examples for t in e.input_ids]
    assert flat_mask == [m for e in examples for m in e.loss_mask]

    input_ids, attention_mask, loss_mask = collate(blocks, pad_id=-1)
    assert input_ids.shape == attention_mask.shape == loss_mask.shape == (len(blocks), 5)
    last = len(blocks[-1].input_ids)
    assert attention_mask[-1].tolist() == [1] * last + [0] * (5 - last)
    assert loss_mask[-1, last:].sum() == 0 and (input_ids[-1, last:] == -1).all()
    assert input_ids[attention_mask.bool()].tolist() == flat_ids
    assert loss_mask[attention_mask.bool()].tolist() == flat_mask


def test_loss_mask_covers_exactly_the_response_tokens(tokenizer):
    eos = tokenizer.eos_token_id
    ex = encode_example(SFTRecord("f:1", prompt="What is red?", response="A color."), tokenizer)
    assert len(ex.input_ids) == len(ex.loss_mask)
    prompt_text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is red?"}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer("A color.", add_special_tokens=False)["input_ids"] + [eos]
    assert ex.input_ids == prompt_ids + response_ids
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * len(response_ids)
    trained = [t for t, m in zip(ex.input_ids, ex.loss_mask, strict=True) if m]
    assert tokenizer.decode(trained) == "A color.<|im_end|>"

    chat = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is red?"},
        {"role": "assistant", "content": "A color."},
    )
    ex = encode_example(SFTRecord("f:2", messages=chat), tokenizer)
    prompt_text = tokenizer.apply_chat_template(list(chat[:2]), tokenize=False,
                                                add_generation_prompt=True)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == prompt_ids + response_ids
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * len(response_ids)

    ex = encode_example(SFTRecord("f:3", text="Plain words."), tokenizer)
    assert ex.input_ids == tokenizer("Plain words.")["input_ids"] + [eos]
    assert ex.loss_mask == [1] * len(ex.input_ids)


def test_without_a_chat_template_the_prompt_is_plain_text(tokenizer):
    plain = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    ex = encode_example(SFTRecord("f:1", prompt="Q: red?\nA:", response=" yes"), plain)
    prompt_ids = plain("Q: red?\nA:")["input_ids"]
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.loss_mask == [0] * len(prompt_ids) + [1] * (len(ex.input_ids) - len(prompt_ids))
    chat = ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})
    with pytest.raises(DataError, match="f:9: chat messages need a tokenizer with a chat"):
        encode_example(SFTRecord("f:9", messages=chat), plain)


def test_sft_loss_counts_only_the_masked_targets():
    V = 8
    input_ids = torch.tensor([[1, 2, 3, 4]])
    loss_mask = torch.tensor([[0, 0, 1, 1]])  # targets: token 3 (from pos 1) and 4 (from pos 2)
    logits = torch.zeros(1, 4, V)
    loss, n = sft_loss(logits, input_ids, loss_mask)
    assert n == 2 and loss.item() == pytest.approx(torch.log(torch.tensor(V)).item())
    logits[0, 1, 3] = logits[0, 2, 4] = 50.0  # certain on the targets
    logits[0, 0] = torch.randn(V) * 10  # junk where nothing is trained
    loss, n = sft_loss(logits, input_ids, loss_mask)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_no_packing_cuts_long_examples_and_drops_those_left_without_targets():
    examples = [
        Example([1, 2, 3], [0, 1, 1]),
        Example([1, 2, 3, 4, 5, 6], [0, 0, 1, 1, 1, 1]),  # cut to 4, keeps targets
        Example([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1]),  # cut to 4: nothing left to learn
    ]
    made = make_rows(examples, packing=False, max_length=4)
    assert (made.truncated, made.dropped) == (2, 1)
    assert [r.input_ids for r in made.rows] == [[1, 2, 3], [1, 2, 3, 4]]
    assert [r.loss_mask for r in made.rows] == [[0, 1, 1], [0, 0, 1, 1]]


def test_settings_reject_bad_values(tmp_path):
    with pytest.raises(ValueError, match="epochs"):
        SFTSettings(data=tmp_path, out=tmp_path, model=tmp_path, epochs=0)
    with pytest.raises(ValueError, match="target_modules"):
        SFTSettings(data=tmp_path, out=tmp_path, model=tmp_path, target_modules=())


# --------------------------------------------------------------------------------------------
# A real run on the tiny model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("sft")
    data = _write_jsonl(base / "pattern.jsonl",
                        [{"prompt": p, "response": PATTERN} for p in PROMPTS * 2])
    # A high rate and small batches: a few dozen steps teach the random tiny model the pattern.
    config = SFTSettings(data=data, out=base / "adapter", model=tiny_model_dir, epochs=6, lr=1e-2,
                       batch_size=2, max_length=64, lora_r=8, lora_alpha=16, seed=0,
                       progress=False)
    return config, run_sft(config)


@pytest.fixture(scope="module")
def trained(sft_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, out = sft_run
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(out), is_trainable=True)


def test_training_lowers_the_loss_clearly(sft_run, trained, tokenizer):
    config, out = sft_run
    lines = [json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(1, config.epochs + 1))
    assert lines[-1]["loss"] < 0.7 * lines[0]["loss"]

    # The same data, measured with the adapter off (the base) and on.
    from services.trainer.data import read_sft

    examples = [encode_example(r, tokenizer) for r in read_sft(config.data)]
    input_ids, attention_mask, loss_mask = collate(pack(examples, 64), tokenizer.pad_token_id)
    trained.eval()
    with torch.no_grad():
        after, _ = sft_loss(trained(input_ids=input_ids, attention_mask=attention_mask).logits,
                            input_ids, loss_mask)
        with trained.disable_adapter():
            before, _ = sft_loss(
                trained(input_ids=input_ids, attention_mask=attention_mask).logits,
                input_ids, loss_mask)
    assert after.item() < 0.7 * before.item(), (before.item(), after.item())


def test_the_adapter_moves_greedy_output_to_the_pattern(trained, tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    trained.eval()

    def greedy() -> str:
        out = trained.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=12, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    with torch.no_grad():
        after = greedy()
        with trained.disable_adapter():
            before = greedy()
    assert "red green blue" not in before
    assert after.startswith("red green blue"), after


def test_the_folder_is_a_trainable_peft_adapter(sft_run, trained):
    config, out = sft_run
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    peft_config = json.loads((out / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == 8
    assert sorted(peft_config["target_modules"]) == sorted(config.target_modules)
    assert not peft_config.get("modules_to_save") and peft_config["lora_dropout"] == 0.0
    trainable = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # It trained: B is zero at init, so a non-zero B means the weights were saved after steps.
    assert any(p.abs().sum() > 0 for n, p in trained.named_parameters() if "lora_B" in n)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_command_trains_and_prints_the_folder(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "red green blue"},
                                               {"prompt": "Hi", "response": "Hello."}])
    out = tmp_path / "adapter"
    result = CliRunner().invoke(train_sft, [
        "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
        "--epochs", "1", "--batch-size", "1", "--max-length", "16", "--lora-r", "4",
        "--target-modules", "q_proj,v_proj", "--no-packing",
    ])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    assert (out / "adapter_model.safetensors").is_file()
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == [
        "q_proj", "v_proj"]
    assert len((out / METRICS_FILE).read_text().splitlines()) == 1


def test_command_bad_data_is_a_click_error_with_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "no response"}\nnot json\n')
    result = CliRunner().invoke(train_sft, [
        "--model", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "o"),
    ])
    assert result.exit_code == 1
    assert f'{data}:2: has "prompt" but no "response"' in result.stderr
    assert f"{data}:3: not JSON" in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_command_missing_inputs_are_click_errors(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    runner = CliRunner()
    result = runner.invoke(train_sft, ["--model", str(tiny_model_dir), "--data",
                                               str(tmp_path / "nope.jsonl"), "--out",
                                               str(tmp_path / "o")])
    assert result.exit_code == 1 and "nope.jsonl: cannot read" in result.stderr
    result = runner.invoke(train_sft, ["--model", str(tmp_path / "no-model"), "--data",
                                               str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "rlhf model prepare" in result.stderr
    result = runner.invoke(train_sft, ["--model", str(tiny_model_dir), "--data",
                                               str(data), "--out", str(tmp_path / "o"),
                                               "--target-modules", "nope_proj"])
    assert result.exit_code == 1 and "nope_proj" in result.stderr
    assert "Traceback" not in result.output


def test_out_must_not_be_a_folder_that_holds_something_else(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(train_sft, ["--model", str(tiny_model_dir), "--data",
                                                    str(data), "--out", str(precious)])
    assert result.exit_code == 1 and "non-empty folder that holds no adapter" in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me"


def test_mounted_as_rlhf_train_sft():
    from rlhf.cli import main

    result = CliRunner().invoke(main, ["train", "sft", "--help"])
    assert result.exit_code == 0, result.output
    assert "--no-packing" in result.output and "--target-modules" in result.output

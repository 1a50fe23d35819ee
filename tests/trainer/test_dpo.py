"""DPO (`rlhf train dpo`): the DPO and IPO losses against hand-computed values, a real LoRA run on
the tiny model that learns a property of the chosen answers and shows it on held-out pairs, the
reference (the model the run starts from), bad data, and the adapter pushed to and served by the
real vLLM policy."""

from __future__ import annotations

import asyncio
import json
import math
import random

import pytest
import torch
from click.testing import CliRunner

from services.trainer.dpo.cli import train_dpo
from services.trainer.dpo.settings import DPOSettings
from services.trainer.dpo.train import METRICS_FILE, SETTINGS_FILE, run_dpo
from services.trainer.rl_math import (
    dpo_implicit_rewards,
    dpo_sigmoid_loss,
    ipo_loss,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T = torch.tensor

# --------------------------------------------------------------------------------------------
# The losses
# --------------------------------------------------------------------------------------------

# Two pairs. Pair 1: the policy raised chosen by 0.5 and lowered rejected by 0.5 against the
# reference, h = 1; pair 2: the other way round, twice as much, h = -2.
LOGP_C, LOGP_R = T([-1.0, -3.0]), T([-2.0, -1.0])
REF_C, REF_R = T([-1.5, -2.0]), T([-1.5, -2.0])


def test_implicit_reward_is_beta_times_the_log_ratio():
    assert torch.allclose(dpo_implicit_rewards(LOGP_C, REF_C, 0.5), T([0.25, -0.5]))


def test_dpo_sigmoid_loss_matches_hand_computed_values():
    # beta 0.5: beta*h = 0.5 and -1; -log sigmoid(x) = log(1 + e^-x):
    # log(1 + e^-0.5) = 0.474077, log(1 + e^1) = 1.313262, mean 0.893669.
    loss = dpo_sigmoid_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.5)
    assert loss.item() == pytest.approx(0.893669, abs=1e-6)
    # The policy equal to the reference: log 2, whatever beta.
    same = dpo_sigmoid_loss(REF_C, REF_R, REF_C, REF_R, beta=3.0)
    assert same.item() == pytest.approx(math.log(2), abs=1e-6)


def test_dpo_label_smoothing_matches_hand_computed_value():
    # Pair 1 alone, eps 0.1: 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.524077.
    loss = dpo_sigmoid_loss(LOGP_C[:1], LOGP_R[:1], REF_C[:1], REF_R[:1], beta=0.5,
                            label_smoothing=0.1)
    assert loss.item() == pytest.approx(0.524077, abs=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    logp_c, logp_r = LOGP_C.clone().requires_grad_(), LOGP_R.clone().requires_grad_()
    dpo_sigmoid_loss(logp_c, logp_r, REF_C, REF_R, beta=0.5).backward()
    assert (logp_c.grad < 0).all() and (logp_r.grad > 0).all()
    # The badly ordered pair (2) pulls harder: -d/dh log sigmoid(beta h) = beta sigmoid(-beta h).
    assert logp_c.grad[1].abs() > logp_c.grad[0].abs()
    assert logp_c.grad[0].item() == pytest.approx(-0.5 * torch.sigmoid(T(-0.5)).item() / 2)


def test_ipo_loss_matches_hand_computed_values():
    # beta (tau) 0.25: target h = 1 / (2 * 0.25) = 2; (1 - 2)^2 = 1, (-2 - 2)^2 = 16, mean 8.5.
    assert ipo_loss(LOGP_C, LOGP_R, REF_C, REF_R, beta=0.25).item() == pytest.approx(8.5)
    # Past the target margin the loss rises again: IPO does not push a pair further.
    assert ipo_loss(T([0.0]), T([-3.0]), T([0.0]), T([0.0]), beta=0.25).item() == \
        pytest.approx(1.0)


def test_settings_refuse_label_smoothing_with_ipo(tmp_path):
    from rlhf.plumbing.config import ConfigError

    with pytest.raises(ConfigError, match="label_smoothing applies to the sigmoid loss only"):
        DPOSettings.load(None, data=tmp_path / "d", out=tmp_path / "o", loss="ipo",
                         label_smoothing=0.1)


# --------------------------------------------------------------------------------------------
# Data: chosen answers end with "blue", rejected ones with something else
# --------------------------------------------------------------------------------------------

SUBJECTS = ("the cat|a dog|my friend|the teacher|our team|the robot|a bird|the model|this user"
            "|a child|the farmer|she|he|we").split("|")
VERBS = "likes sees finds writes reads builds helps answers makes takes gives wants knows".split()
OBJECTS = ("a red apple|the long story|an old book|the next question|good music|a small house"
           "|the green garden|warm bread|the right answer|a new song|the river|some water"
           ).split("|")
OTHER_ENDINGS = "today|at night|with care|very quickly|before dinner|again".split("|")
PROMPTS = ["Tell me something.", "Say a sentence.", "What happened?", "Describe a scene.",
           "Write one line.", "Go on."]
WORD = "blue"
BETA = 0.1
# What the run must reach on held-out pairs (it starts at margin 0, accuracy 0: the policy is
# the reference). Measured on this data and seed: margin 2.1, accuracy 1.0 after 6 steps.
MIN_HELD_OUT_MARGIN = 1.0
MIN_HELD_OUT_ACCURACY = 0.9


def preference_rows(n: int, seed: int) -> list[dict]:
    """Lines as the gateway's preference export writes them (request_id and cursor too)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        body = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
        rows.append({"prompt": rng.choice(PROMPTS), "chosen": f"{body} {WORD}",
                     "rejected": f"{body} {rng.choice(OTHER_ENDINGS)}",
                     "request_id": f"req-{seed}-{i}", "created_at": 1.0 + i,
                     "cursor": f"{seed:04d}{i:08d}"})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("dpo")
    settings = DPOSettings(
        data=write_jsonl(base / "train.jsonl", preference_rows(48, seed=1)),
        val_file=write_jsonl(base / "val.jsonl", preference_rows(24, seed=2)),
        out=base / "adapter", model=tiny_model_dir, beta=BETA, epochs=1, lr=5e-3, batch_size=8,
        lora_r=8, lora_alpha=16, eval_every=2, seed=0, progress=False,
        admin_token="not-in-any-file")
    return settings, run_dpo(settings)


def _pair_logps(model, tokenizer, rows):
    """[N, 2] sequence logprobs of (chosen, rejected), computed here independently of the
    trainer's batching: one answer at a time, prompt rendered as the policy renders it."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}],
                                               tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        pair = []
        for answer in (row["chosen"], row["rejected"]):
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [
                tokenizer.eos_token_id]
            ids = torch.tensor([prompt_ids + answer_ids])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt_ids) - 1:-1]
            pair.append(logits.log_softmax(-1).gather(-1, ids[0, len(prompt_ids):, None]).sum())
        out.append(torch.stack(pair))
    return torch.stack(out)


def test_the_trained_adapter_prefers_the_property_on_held_out_pairs(dpo_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings, out = dpo_run
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    held_out = [json.loads(x) for x in settings.val_file.read_text().splitlines()]
    logp = _pair_logps(model, tokenizer, held_out)
    with model.disable_adapter():  # the reference: the base model
        ref = _pair_logps(model, tokenizer, held_out)
    r_c = dpo_implicit_rewards(logp[:, 0], ref[:, 0], BETA)
    r_r = dpo_implicit_rewards(logp[:, 1], ref[:, 1], BETA)
    margin, accuracy = (r_c - r_r).mean().item(), (r_c > r_r).float().mean().item()
    assert margin > MIN_HELD_OUT_MARGIN, margin
    assert accuracy >= MIN_HELD_OUT_ACCURACY, accuracy

    # metrics.jsonl said the same of the same pairs, from the trainer's own batched passes.
    last = read_metrics(out)[-1]
    assert last["val/margin"] == pytest.approx(margin, abs=1e-3)
    assert last["val/accuracy"] == pytest.approx(accuracy)


def test_metrics_start_at_the_reference_and_log_every_evaluation(dpo_run):
    _, out = dpo_run
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [0, 2, 4, 6]
    # Before the first step the policy is the reference (a fresh LoRA adds nothing): every
    # implicit reward is 0, the loss log 2, and a tie counts as wrong.
    first = lines[0]
    assert first["val/margin"] == 0.0 and first["val/accuracy"] == 0.0
    assert first["val/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert "train/loss" not in first
    for line in lines[1:]:
        assert {"train/loss", "train/accuracy", "train/margin", "val/loss", "val/accuracy",
                "val/margin", "val/chosen_reward", "val/rejected_reward"} <= set(line)
        assert line["val/margin"] == pytest.approx(
            line["val/chosen_reward"] - line["val/rejected_reward"], abs=1e-5)
    assert lines[-1]["val/loss"] < 0.5 * lines[0]["val/loss"]
    assert lines[-1]["epoch"] == 1.0


def test_the_folder_is_a_plain_lora_adapter_without_secrets(dpo_run):
    settings, out = dpo_run
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert sorted(config["target_modules"]) == sorted(settings.target_modules)
    assert not config.get("modules_to_save") and config["lora_dropout"] == 0.0
    assert (out / "adapter_model.safetensors").is_file()
    saved = json.loads((out / SETTINGS_FILE).read_text())
    assert saved["loss"] == "sigmoid" and saved["beta"] == BETA
    assert "admin_token" not in saved
    assert not any("not-in-any-file" in p.read_text(errors="replace")
                   for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
    # Nothing left behind next to it (the run grew in a hidden folder, renamed at the end).
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_init_adapter_is_the_reference_and_is_trained_further(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.fixtures.policy_helpers import make_adapter

    sft = make_adapter(tiny_model_dir, tmp_path / "sft", seed=7, r=4)
    settings = DPOSettings(
        data=write_jsonl(tmp_path / "d.jsonl", preference_rows(8, seed=3)),
        val_file=write_jsonl(tmp_path / "v.jsonl", preference_rows(4, seed=4)),
        out=tmp_path / "dpo", model=tiny_model_dir, init_adapter=sft, epochs=1, lr=1e-2,
        batch_size=8, progress=False)
    out = run_dpo(settings)
    first, last = read_metrics(out)
    # The random SFT adapter changes every logprob: measured against the base (adapter off)
    # the margins at step 0 would not be 0. Against the adapter the run starts from they are.
    assert first["val/margin"] == 0.0 and first["val/loss"] == pytest.approx(math.log(2))
    assert last["val/margin"] != 0.0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4  # the SFT's LoRA
    before, after = load_file(str(sft / "adapter_model.safetensors")), load_file(
        str(out / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_command_trains_ipo_prints_the_folder_and_tracks(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(20, seed=5))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(train_dpo, [
        "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
        "--loss", "ipo", "--beta", "0.1", "--val-fraction", "0.2", "--batch-size", "8",
        "--lr", "5e-3", "--lora-r", "4", "--target-modules", "q_proj,v_proj",
        "--report-to", "tensorboard", "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [0, 2]  # 16 training pairs: 2 steps, 4 held out
    assert lines[0]["val/loss"] == pytest.approx(25.0)  # (0 - 1 / (2 * 0.1))^2
    assert lines[-1]["val/margin"] > 0 and lines[-1]["val/loss"] < 25.0
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == [
        "q_proj", "v_proj"]
    # The tracker got the figures of metrics.jsonl under the same keys.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {k for m in lines for k in m} - {"step"}
    assert [e.value for e in events.Scalars("val/margin")] == pytest.approx(
        [m["val/margin"] for m in lines])


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "p", "response": "r", "rating": 4}\n',
     "holds rating lines (prompt, response, rating); DPO trains on preference lines"),
    ("", "no records (the file is empty)"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "response": "r", '
     '"rating": 1}\n', ":2: a rating line in a file of preference lines"),
    ('{"prompt": "p", "chosen": "a"}\n', ':1: has no "rejected"'),
    ('{"prompt": "p", "chosen": "same", "rejected": "same"}\n', "no preference to learn"),
])
def test_command_bad_data_exits_1_with_the_reason(tiny_model_dir, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    result = CliRunner().invoke(train_dpo, ["--model", str(tiny_model_dir), "--data", str(data),
                                            "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_command_set_up_mistakes_exit_with_a_message(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(4, seed=6))
    runner = CliRunner()
    result = runner.invoke(train_dpo, ["--model", str(tiny_model_dir), "--data", str(data),
                                       "--out", str(tmp_path / "o"), "--init-adapter",
                                       str(tmp_path)])
    assert result.exit_code == 1 and "is not an adapter folder" in result.stderr
    result = runner.invoke(train_dpo, ["--model", str(tiny_model_dir), "--data", str(data),
                                       "--out", str(tmp_path / "o"), "--val-fraction", "0.9"])
    assert result.exit_code == 1 and "no training pairs left" in result.stderr
    result = runner.invoke(train_dpo, ["--model", str(tiny_model_dir), "--data", str(data),
                                       "--out", str(tmp_path / "o"), "--loss", "ipo",
                                       "--label-smoothing", "0.1"])
    assert result.exit_code == 2 and "sigmoid loss only" in result.stderr
    assert "Traceback" not in result.output


def test_command_keeps_the_adapter_when_the_push_fails(tiny_model_dir, tmp_path):
    from tests.fixtures.ports import free_port

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(4, seed=6))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(train_dpo, [
        "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
        "--val-fraction", "0", "--lora-r", "4", "--no-progress",
        "--push-to", f"127.0.0.1:{free_port()}", "--push-timeout-seconds", "1",
    ])
    assert result.exit_code == 1
    assert f"the adapter is in {out}, but the push failed" in result.stderr
    assert "policy at 127.0.0.1" in result.stderr and "Traceback" not in result.output
    assert (out / "adapter_model.safetensors").is_file()


def test_mounted_as_rlhf_train_dpo():
    from rlhf.cli import main

    result = CliRunner().invoke(main, ["train", "dpo", "--help"])
    assert result.exit_code == 0, result.output
    assert "--push-to" in result.output and "--loss [sigmoid|ipo]" in result.output


# --------------------------------------------------------------------------------------------
# Served by the real policy
# --------------------------------------------------------------------------------------------


@pytest.mark.vllm
@pytest.mark.slow
async def test_pushed_adapter_is_served_by_the_policy(policy_lora, tmp_path):
    from rlhf.v1 import policy_pb2
    from services.trainer.dpo.push import push_adapter_folder
    from tests.fixtures.policy_helpers import (
        ADMIN,
        SWAP_PROMPT,
        generate_greedy,
        hf_greedy,
        pinned,
        set_active,
        stub,
        version_of,
    )

    name = "dpo-served"
    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(16, seed=8))
    out = tmp_path / "adapter"
    policy = stub(policy_lora.channel)
    before = (await policy.ListAdapters(policy_pb2.ListAdaptersRequest(), timeout=60)).active
    args = ["--model", str(policy_lora.model_dir), "--data", str(data), "--out", str(out),
            "--val-fraction", "0", "--lr", "5e-3", "--lora-r", "8", "--no-progress",
            "--push-to", policy_lora.addr, "--adapter-name", name, "--push-timeout-seconds", "5"]
    try:
        # The command runs its own event loop: off this one, which serves the policy.
        refused = await asyncio.to_thread(CliRunner().invoke, train_dpo,
                                          [*args, "--admin-token", "wrong-token"])
        assert refused.exit_code == 1 and "push failed" in refused.stderr
        assert "UNAUTHENTICATED" in refused.stderr or "PERMISSION_DENIED" in refused.stderr
        result = await asyncio.to_thread(CliRunner().invoke, train_dpo,
                                         [*args, "--admin-token", ADMIN])
        assert result.exit_code == 0, result.output
        assert f"pushed {name} v1 to {policy_lora.addr}" in result.stderr

        # The policy serves exactly these weights: greedy tokens equal HF with the adapter.
        tokens, served = await generate_greedy(policy_lora, 8, pinned(name, 1))
        assert served == (name, 1)
        assert tokens == hf_greedy(policy_lora.model_dir, out, SWAP_PROMPT, 8)

        # A second push of the name takes the next version every replica accepts.
        settings = DPOSettings(data=data, out=out, model=policy_lora.model_dir,
                               push_to=[policy_lora.addr], adapter_name=name, admin_token=ADMIN)
        assert (await push_adapter_folder(settings, out)).version == 2
        listed = await policy.ListAdapters(policy_pb2.ListAdaptersRequest(name=name), timeout=60)
        assert [a.adapter.version for a in listed.adapters] == [1, 2]
    finally:  # the policy is shared by the session: leave active what was active
        previous = version_of(before)
        await set_active(policy_lora, *(previous or ()))


@pytest.mark.slow
def test_torchrun_two_ranks_match_one_process(tiny_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    from tests.fixtures.ports import free_port

    data = write_jsonl(tmp_path / "d.jsonl", preference_rows(16, seed=9))
    val = write_jsonl(tmp_path / "v.jsonl", preference_rows(6, seed=10))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for ranks in (1, 2):
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
             str(ranks), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             "-m", "rlhf.cli", "train", "dpo", "--model", str(tiny_model_dir), "--data",
             str(data), "--val-file", str(val), "--out", str(tmp_path / f"r{ranks}"), "--lr",
             "5e-3", "--lora-r", "4", "--batch-size", "8", "--no-progress", "--device", "cpu"],
            env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip() == str(tmp_path / f"r{ranks}")  # rank 0 alone prints
    one, two = read_metrics(tmp_path / "r1"), read_metrics(tmp_path / "r2")
    assert [m["step"] for m in two] == [m["step"] for m in one] == [0, 2]
    for key in ("train/loss", "train/margin", "val/loss", "val/margin"):
        assert two[-1][key] == pytest.approx(one[-1][key], abs=1e-4), key
    a = load_file(str(tmp_path / "r1" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "r2" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4

"""The rlhf.v1 contract: generated code is current, buf lint and buf breaking pass, a breaking
change is caught, and messages round-trip on the wire."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.v1 import common_pb2, policy_pb2, reward_pb2, trainer_pb2

ROOT = Path(__file__).resolve().parents[2]
BUF = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
RELEASED = ROOT / "protos" / "released" / "rlhf-v1.binpb"


def test_generated_code_is_current(tmp_path):
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
    )
    fresh = tmp_path / "rlhf" / "v1"
    committed = ROOT / "rlhf" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, (
        f"generated code is stale ({mismatch + errors}); run `python scripts/gen_protos.py`"
    )


def _buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    assert BUF, "buf not installed (pip package buf-bin)"
    return subprocess.run([BUF, *args], cwd=cwd, capture_output=True, text=True)


def test_buf_lint_passes():
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_against_released_image():
    assert RELEASED.exists()
    result = _buf("breaking", "--against", str(RELEASED))
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_removed_field(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    policy = tmp_path / "protos" / "rlhf" / "v1" / "policy.proto"
    text = policy.read_text()
    removed = "  // Why it ended.\n  FinishReason finish_reason = 6;\n"
    assert removed in text
    policy.write_text(text.replace(removed, ""))
    result = _buf("breaking", "--against", str(RELEASED), cwd=tmp_path)
    assert result.returncode != 0
    assert "finish_reason" in result.stdout + result.stderr


def test_generate_request_round_trip():
    req = policy_pb2.GenerateRequest(
        prompts=[
            common_pb2.Prompt(text="Hello"),
            common_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 2, 3])),
            common_pb2.Prompt(
                chat=common_pb2.ChatConversation(
                    messages=[common_pb2.ChatMessage(role="user", content="Hi")]
                )
            ),
        ],
        params=policy_pb2.SamplingParams(
            n=4, max_tokens=64, temperature=0.0, top_p=0.9, top_k=50, stop=["\n\n"], seed=7,
            logprobs=True,
        ),
        adapter=policy_pb2.AdapterSelector(
            target=policy_pb2.ADAPTER_TARGET_PINNED,
            pinned=policy_pb2.AdapterRef(name="policy", version=3),
        ),
    )
    back = policy_pb2.GenerateRequest.FromString(req.SerializeToString())
    assert back == req
    assert [p.WhichOneof("kind") for p in back.prompts] == ["text", "token_ids", "chat"]
    # temperature is optional: an explicit 0 (greedy) is distinguishable from "unset".
    assert back.params.HasField("temperature") and back.params.temperature == 0.0
    assert not policy_pb2.SamplingParams().HasField("temperature")
    assert back.params.HasField("seed") and not policy_pb2.SamplingParams().HasField("seed")


def test_generate_response_round_trip():
    resp = policy_pb2.GenerateResponse(
        results=[
            policy_pb2.PromptResult(
                prompt_index=0,
                prompt_token_ids=[5, 6],
                completions=[
                    policy_pb2.Completion(
                        index=0, text="ok", token_ids=[9, 2], logprobs=[-0.5, -0.25],
                        finish_reason=policy_pb2.FINISH_REASON_STOP,
                    )
                ],
                served_by=policy_pb2.ServedBy(adapter=policy_pb2.AdapterRef(name="p", version=2)),
            )
        ],
        usage=common_pb2.Usage(prompt_tokens=2, completion_tokens=2),
        request_id="r1",
    )
    back = policy_pb2.GenerateResponse.FromString(resp.SerializeToString())
    assert back == resp
    assert list(back.results[0].completions[0].logprobs) == [-0.5, -0.25]


def test_push_adapter_stream_messages():
    header = policy_pb2.PushAdapterRequest(
        header=policy_pb2.AdapterHeader(
            adapter=policy_pb2.AdapterRef(name="policy", version=1),
            sha256="ab" * 32, size_bytes=3, base_model_id="tiny", peft_config_json="{}",
        )
    )
    chunk = policy_pb2.PushAdapterRequest(data=b"\x00\x01\x02")
    assert policy_pb2.PushAdapterRequest.FromString(header.SerializeToString()).WhichOneof(
        "part"
    ) == "header"
    back = policy_pb2.PushAdapterRequest.FromString(chunk.SerializeToString())
    assert back.data == b"\x00\x01\x02"


def test_score_and_trainer_messages_round_trip():
    req = reward_pb2.ScoreRequest(
        items=[
            reward_pb2.ScoreItem(prompt="2+2?", completion="4", reference="4",
                                 metadata={"task": "math"}),
            reward_pb2.ScoreItem(
                prompt_messages=[common_pb2.ChatMessage(role="user", content="hi")],
                completion="hello",
            ),
        ]
    )
    assert reward_pb2.ScoreRequest.FromString(req.SerializeToString()) == req
    run = trainer_pb2.StartRunRequest(
        run_id="r", config=trainer_pb2.RunConfig(
            algorithm=trainer_pb2.ALGORITHM_GRPO, steps=10, max_staleness=0,
            target_modules=["q_proj", "v_proj"],
        )
    )
    back = trainer_pb2.StartRunRequest.FromString(run.SerializeToString())
    assert back == run
    # max_staleness=0 (on-policy) is distinguishable from "use the default".
    assert back.config.HasField("max_staleness")
    update = trainer_pb2.WatchRunResponse(metrics=trainer_pb2.StepMetrics(step=3, kl=0.1))
    assert trainer_pb2.WatchRunResponse.FromString(update.SerializeToString()).WhichOneof(
        "update"
    ) == "metrics"


@pytest.mark.parametrize("proto", sorted((ROOT / "protos" / "rlhf" / "v1").glob("*.proto")))
def test_every_field_is_documented(proto):
    """Belt and braces beside buf's COMMENTS rules: every field line is preceded by a comment."""
    lines = proto.read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.endswith(";") and "=" in stripped and not stripped.startswith(
            ("option", "syntax", "//")
        ):
            assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} lacks a comment"

"""bench/gpu_learner.py on CPU with the tiny model: it runs the learner's update for PPO and GRPO
without vLLM or model files, and ends with the JSON line of figures its readers quote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_learner.py"

# Runs the script as __main__ and then checks that nothing on its path imported vLLM.
RUNNER = """
import runpy, sys
sys.argv = [{script!r}] + {argv!r}
sys.path.insert(0, {bench!r})  # as `python bench/gpu_learner.py` does
{block}
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:
    print("VLLM_IMPORTED=" + str(any(m.split(".")[0] == "vllm" for m in sys.modules)))
"""


def run(argv: list[str], block: str = "", tmp_path: Path | None = None):
    code = RUNNER.format(script=str(SCRIPT), bench=str(SCRIPT.parent), argv=argv, block=block)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path or Path.home())}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


@pytest.mark.slow
def test_tiny_cpu_run_reports_both_algorithms(tmp_path):
    done = run(["--device", "cpu", "--size", "tiny", "--sequences", "8", "--prompt-tokens", "6",
                "--completion-tokens", "8", "--minibatch", "4", "--steps", "1", "--warmup", "0",
                "--dtype", "float32", "--peak-tflops", "1", "--workdir", str(tmp_path)],
               tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "VLLM_IMPORTED=False"
    figures = json.loads(lines[-2])
    assert figures["bench"] == "gpu_learner" and figures["device"] == "cpu"
    assert "MFU = (6*N*trained tokens + 2*N*no-grad forward tokens)" in done.stdout
    rows = {r["algo"]: r for r in figures["results"]}
    assert set(rows) == {"ppo", "grpo"}
    for row in rows.values():
        assert row["size"] == "tiny" and row["tokens_per_s"] > 0
        assert row["body_params"] + row["lm_head_params"] < row["params"]
        assert row["peak_memory_gib"] > 0 and 0 < row["mfu_4n"] < row["mfu"]
        assert row["seconds_per_step"] >= row["old_seconds"] + row["ref_seconds"]
        # The learner's own count of passes (1.0 = every row once), one epoch.
        assert row["passes_per_step"]["forward_ref"] == 1
        assert row["passes_per_step"]["backward_policy"] == 1
    # Only PPO has a critic: a no-grad value pass, then a forward/backward per minibatch.
    assert rows["ppo"]["passes_per_step"]["forward_value"] == 2
    assert rows["ppo"]["passes_per_step"]["backward_value"] == 1
    assert rows["ppo"]["value_seconds"] > 0
    assert rows["grpo"]["passes_per_step"]["forward_value"] == 0
    assert rows["grpo"]["value_seconds"] == 0
    # The work directory (models included) is removed.
    assert list(tmp_path.glob("gpu-learner-*")) == []


def test_missing_dependency_is_named_not_a_traceback(tmp_path):
    # As on a GPU image without pydantic: the script names the package to bring.
    done = run(["--device", "cpu", "--size", "tiny"], block="sys.modules['pydantic'] = None",
               tmp_path=tmp_path)
    assert done.returncode != 0
    assert "missing Python package 'pydantic'" in done.stderr
    assert "bench/README.md" in done.stderr
    assert "Traceback" not in done.stderr

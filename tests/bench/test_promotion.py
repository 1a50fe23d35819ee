"""bench/promotion.py smoke run on the tiny model (two real vLLM policy replicas, a reward
service and a gateway, small counts): its last line is the one JSON line, with the immediate
promotion, both canary trials, and the bad version's share within the canary fraction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.vllm
@pytest.mark.slow
def test_smoke_run_ends_with_one_json_line(vllm_cpu_env):
    done = subprocess.run(
        [sys.executable, str(BENCH / "promotion.py"), "--model", "tiny", "--clients", "2",
         "--fraction", "0.25", "--min-requests", "4", "--tokens", "4", "--repeats", "1",
         "--sft-epochs", "2", "--warmup", "0.5", "--timeout", "600", "--dtype", "float32"],
        capture_output=True, text=True, timeout=1500, env=dict(os.environ))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    figures = json.loads(lines[-1])
    assert all(not line.startswith("{") for line in lines[:-1])
    assert figures["bench"] == "promotion" and figures["replicas"] == 2
    assert len(figures["immediate_seconds"]) == 1
    for trial in ("canary_good", "canary_bad"):
        run = figures[trial]
        assert run["decision"] in ("promoted", "rolled_back"), run
        assert run["errors"] == 0, run
        # Each arm reached the verdict's sample size (or the deadline did).
        assert run["arms"]["candidate"]["scored"] >= 4 or run["seconds"] >= 600, run
        assert run["candidate_share"] <= 0.25, run

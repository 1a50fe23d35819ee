"""`rlhf up` as a real process on the tiny model: all four services start health-checked, a short
PPO run started through TrainerService moves the adapter version the gateway serves, and Ctrl-C
stops everything (vLLM's engine-core children included) with no process or port left behind.
A service that fails to start stops the others and its log's end is shown. `rlhf demo` runs its
whole loop on the same supervisor (shrunk to the tiny model and two steps)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import sys
from pathlib import Path

import httpx
import pytest

from rlhf.clients import CallFailed
from rlhf.stack.rundir import TRAINER_TOKEN_FILE, trainer_token
from rlhf.v1 import trainer_pb2
from tests.stack.helpers import (
    UpProcess,
    alive,
    best_of_n,
    get_run,
    mentions,
    port_free,
    read_metrics,
    session_members,
    stack_ports,
    stack_processes,
    start_run,
    status_of,
    wait_for,
    write_inputs,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


async def test_up_trains_serves_and_stops_clean(tiny_model_dir, tmp_path):
    prompts, config = write_inputs(tmp_path / "inputs")
    up = UpProcess.start(tmp_path / "stack", tiny_model_dir, prompts, config)
    try:
        state = await up.wait_ready()
        assert set(state["services"]) == {"policy", "reward", "trainer", "gateway"}
        for name, svc in state["services"].items():
            assert svc["state"] == "ready", name
            assert (up.run_dir / "logs" / f"{name}.log").read_text().count(f"READY {svc['kind']}")
        out = up.text()
        gateway = state["gateway_url"]
        assert gateway in out and state["trainer_addr"] in out  # the URLs are printed
        # Each service runs in a session of its own; the policy's holds vLLM's engine core too.
        policy_group = session_members(state["services"]["policy"]["pid"])
        assert len(policy_group) >= 2, policy_group
        processes = stack_processes(state)

        assert await status_of(gateway, "/healthz") == 200
        assert await status_of(gateway, "/readyz") == 200
        before = await best_of_n(gateway)
        assert before.status_code == 200, before.text
        assert before.json()["adapter_version"] == 0

        run_cfg = trainer_pb2.RunConfig(steps=3, prompts_per_step=4, samples_per_prompt=2,
                                        max_new_tokens=8, learning_rate=3e-3, seed=1)
        # The trainer takes runs only from holders of its token, kept private in the run dir.
        token_file = up.run_dir / TRAINER_TOKEN_FILE
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        with pytest.raises(CallFailed, match="UNAUTHENTICATED"):
            await start_run(state["trainer_addr"], "up-test", run_cfg, token="")
        token = trainer_token(up.run_dir)
        watch = await start_run(state["trainer_addr"], "up-test", run_cfg, token)
        await wait_for(lambda: watch.task.done(), 400, "the run to finish")
        watch.task.result()
        run = await get_run(state["trainer_addr"], "up-test", token)
        assert run.state == trainer_pb2.RUN_STATE_COMPLETED, run.message
        assert watch.steps == [1, 2, 3]
        assert [r["step"] for r in read_metrics(run.out_dir)] == [1, 2, 3]

        # The trainer pushed every version into the running policy; the gateway serves the last.
        after = await best_of_n(gateway, n=3, return_candidates=True)
        assert after.status_code == 200, after.text
        body = after.json()
        assert body["adapter_version"] == run.adapter_version == watch.metrics[-1].adapter_version
        assert body["adapter_version"] > before.json()["adapter_version"]
        assert body["model"] == f"policy@v{run.adapter_version}"
        assert body["best"]["score"] == max(c["score"] for c in body["candidates"])
        async with httpx.AsyncClient(trust_env=False) as client:
            models = (await client.get(f"{gateway}/v1/models")).json()
            trainer_metrics = (await client.get(state["services"]["trainer"]["metrics"])).text
        assert f"policy@v{run.adapter_version}" in {m["id"] for m in models["data"]}
        assert "rlhf_trainer_step 3.0" in trainer_metrics

        # Ctrl-C: every service drains and exits, and nothing of the stack is left.
        assert up.stop(signal.SIGINT) == 0, up.text()
        assert "All services stopped." in up.text()
        assert up.state()["state"] == "stopped"
        assert all(svc["state"] == "stopped" for svc in up.state()["services"].values())
        left = [p for p in processes if alive(p)] + mentions(str(up.run_dir))
        assert not left, left
        assert not stack_processes(state)
        assert all(port_free(port) for port in stack_ports(state))
        assert not Path(state["services"]["policy"]["ipc_dir"]).exists()  # vLLM's IPC sockets
    finally:
        up.kill()


async def test_a_service_that_fails_to_start_stops_the_rest(tiny_model_dir, tmp_path):
    prompts, config = write_inputs(tmp_path / "inputs")
    missing = tmp_path / "no-such-reward-model"
    up = UpProcess.start(tmp_path / "stack", tiny_model_dir, prompts, config,
                         "--scorer", f"rm:{missing}")
    try:
        code = up.proc.wait(timeout=300)
        out = up.text()
        assert code == 1, out
        assert "reward failed to start" in out
        assert str(missing) in out  # the end of the reward's log says which model is missing
        state = up.state()
        assert state["state"] == "stopped"
        assert state["services"]["reward"]["state"] in ("failed", "stopped")
        assert not stack_processes(state)
        assert not mentions(str(up.run_dir))
        assert all(port_free(port) for port in stack_ports(state))
    finally:
        up.kill()


async def test_demo_runs_the_loop_on_the_tiny_model(tiny_model_dir, tiny_rm, tmp_path):
    """`rlhf demo` end to end, shrunk: tiny model, an already trained reward model, 2 steps."""
    _, config = write_inputs(tmp_path / "inputs")
    run_dir = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env["RLHF_HOME"] = str(tmp_path / "rlhf-home")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "rlhf.cli", "demo", "--model", str(tiny_model_dir),
        "--reward-model", str(tiny_rm.path), "--config", str(config), "--steps", "2",
        "--run-dir", str(run_dir), env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 600)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2]
    assert summary["before"]["adapter_version"] == 0
    assert summary["after"]["adapter_version"] == summary["adapter_version_last"] > 0
    assert summary["reward_last_quarter_mean"] - summary["reward_first_quarter_mean"] == (
        pytest.approx(summary["reward_rise"]))
    assert (run_dir / "reward_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "reward (mean of first 1 vs last 1 steps)" in (run_dir / "summary.txt").read_text()
    for phase in ("Best-of-n before training", "PPO through TrainerService", "step   2/2"):
        assert phase in text
    assert not mentions(str(run_dir))

"""Fault drill on a real `rlhf up` stack (tiny model, two policy replicas): while a PPO run goes
on, the reward service is killed and started again, then one policy process. The run waits and
goes on, loses no completed step, and the killed policy's engine core does not outlive it. The
gateway answers 503 while the reward is down and 200 after; with one policy replica down it goes
on answering from the other, and with both down it answers 503.

The supervisor restarts a dead service by itself; `<run_dir>/hold/<name>` keeps it down until the
test has seen what it needs (no timing guesses)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from rlhf.stack.rundir import trainer_token
from rlhf.v1 import trainer_pb2
from services.trainer.ppo.checkpoint import latest
from tests.stack.helpers import (
    UpProcess,
    alive,
    best_of_n,
    get_run,
    mentions,
    read_metrics,
    session_members,
    stack_processes,
    start_run,
    status_of,
    stop_run,
    wait_for,
    write_inputs,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
RUN = "drill"


async def test_fault_drill(tiny_model_dir, tmp_path):
    prompts, config = write_inputs(tmp_path / "inputs")
    up = UpProcess.start(tmp_path / "stack", tiny_model_dir, prompts, config,
                         "--policy-replicas", "2")
    try:
        state = await up.wait_ready()
        gateway, trainer = state["gateway_url"], state["trainer_addr"]
        p0, p1 = state["policy_addrs"]
        # A long run, stopped by the test once the drill is over; a push may miss a replica
        # that is down (quorum 1 of 2).
        run_cfg = trainer_pb2.RunConfig(steps=500, prompts_per_step=4, samples_per_prompt=2,
                                        max_new_tokens=8, learning_rate=3e-3, seed=2,
                                        push_quorum=0.5)
        token = trainer_token(up.run_dir)
        watch = await start_run(trainer, RUN, run_cfg, token)
        await wait_for(lambda: len(watch.steps) >= 1, 300, "the first step")

        # ---- 1. the reward service dies
        hold = up.hold("reward")
        reward_pid = up.service("reward")["pid"]
        os.kill(reward_pid, signal.SIGKILL)
        await up.wait_service("reward", "down", 60)
        assert (await best_of_n(gateway)).status_code == 503
        assert await status_of(gateway, "/readyz") == 503
        await wait_for(lambda: "RUN_STATE_WAITING" in watch.states(), 300,
                       "the run to wait for the reward service")
        steps_while_down = len(watch.steps)
        hold.unlink()
        await up.wait_service("reward", "ready", 300, restarts=1)
        assert up.service("reward")["pid"] != reward_pid
        await wait_for(lambda: _ok(best_of_n(gateway)), 120, "a 200 from the gateway")
        await wait_for(lambda: len(watch.steps) > steps_while_down + 1, 300,
                       "the run to go on after the reward came back")
        assert watch.states()[-1] == "RUN_STATE_RUNNING"

        # ---- 2. one policy process dies (SIGKILL to the main process only)
        hold = up.hold("policy-0")
        victim = up.service("policy-0")["pid"]
        group = session_members(victim)
        assert len(group) >= 2, group  # vLLM's engine core runs in a child process
        os.kill(victim, signal.SIGKILL)
        await up.wait_service("policy-0", "down", 60)
        # Its engine core (a child that would outlive it) went with it.
        assert not [p for p in group if alive(p)]
        # The other replica answers: the gateway keeps serving, and the run keeps training,
        # recording that the dead replica missed pushes.
        await wait_for(lambda: _ok(best_of_n(gateway)), 120, "a 200 via the other replica")
        steps_before = len(watch.steps)
        await wait_for(lambda: len(watch.steps) >= steps_before + 2, 300,
                       "steps with one replica down")
        missed = watch.events_of(trainer_pb2.RUN_EVENT_KIND_PUSH_FAILED)
        assert missed and all(p0 in e.message for e in missed)
        hold.unlink()
        await up.wait_service("policy-0", "ready", 300, restarts=1)
        pushes_before = len(watch.events_of(trainer_pb2.RUN_EVENT_KIND_ADAPTER_PUSHED))
        await wait_for(lambda: any(p0 in e.message and p1 in e.message for e in
                                   watch.events_of(trainer_pb2.RUN_EVENT_KIND_ADAPTER_PUSHED)
                                   [pushes_before:]), 300,
                       "a push confirmed by the restarted replica again")

        # ---- 3. every policy replica down: nothing can generate -> 503
        await stop_run(trainer, RUN, token)
        await wait_for(lambda: watch.task.done(), 300, "the run to stop")
        run = await get_run(trainer, RUN, token)
        assert run.state == trainer_pb2.RUN_STATE_STOPPED, run.message
        for name in ("policy-0", "policy-1"):
            up.hold(name)
            os.kill(up.service(name)["pid"], signal.SIGKILL)
        for name in ("policy-0", "policy-1"):
            await up.wait_service(name, "down", 60)
        assert (await best_of_n(gateway)).status_code == 503
        assert await status_of(gateway, "/readyz") == 503

        # No completed step lost or done twice, in the stream and in the run folder.
        steps = [r["step"] for r in read_metrics(run.out_dir)]
        assert steps == list(range(1, run.step + 1)) == watch.steps
        versions = [m.adapter_version for m in watch.metrics]
        assert versions == list(range(versions[0], versions[0] + len(versions)))
        assert latest(Path(run.out_dir)).name == f"step-{run.step}"  # resumable from there

        processes = stack_processes(up.state())
        assert up.stop(signal.SIGTERM) == 0, up.text()
        assert not [p for p in processes if alive(p)]
        assert not mentions(str(up.run_dir))
    finally:
        up.kill()


async def _ok(response_coro):
    response = await response_coro
    return response if response.status_code == 200 else None

"""CPU placement: the cpulist parser, the config checks, and pinning a real process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rlhf.plumbing.config import ConfigError
from rlhf.plumbing.cpus import parse_cpu_list
from services.policy.config import PolicyConfig
from services.trainer.ppo.settings import PPOSettings


def test_cpulist_format():
    assert parse_cpu_list("0-3,6") == [0, 1, 2, 3, 6]
    assert parse_cpu_list("5") == [5]
    assert parse_cpu_list("2, 0-1 ,1") == [0, 1, 2]


@pytest.mark.parametrize("text, says", [
    ("", "empty item"), ("1,,2", "empty item"), ("a", "not N or N-M"), ("1-", "not N or N-M"),
    ("-1", "not N or N-M"), ("3-1", "runs backwards"),
])
def test_bad_cpulists_are_refused_with_the_reason(text, says):
    with pytest.raises(ValueError, match=says):
        parse_cpu_list(text)


def test_services_check_their_cpu_cores_at_load():
    assert PolicyConfig.load(cpu_cores="0-1").cpu_cores == "0-1"
    assert PPOSettings.load(None, cpu_cores="1").cpu_cores == "1"
    with pytest.raises(ConfigError, match="cpu_cores"):
        PolicyConfig.load(cpu_cores="0-x")
    with pytest.raises(ConfigError, match="cpu_cores"):
        PPOSettings.load(None, cpu_cores="2-1")


def test_pinning_moves_every_thread(tmp_path):
    """In a child process (pinning is process-wide): threads started before and after the call,
    torch's own pool included, end up on the chosen core."""
    core = max(os.sched_getaffinity(0))
    script = f"""
import os, threading, time, torch
from rlhf.plumbing.cpus import pin_process
torch.set_num_threads(4)
torch.ones(256, 256) @ torch.ones(256, 256)  # starts the OpenMP pool
early = threading.Thread(target=time.sleep, args=(2,)); early.start()
pin_process([{core}])
late = threading.Thread(target=time.sleep, args=(2,)); late.start()
tasks = os.listdir("/proc/self/task")
placements = {{tuple(os.sched_getaffinity(int(t))) for t in tasks}}
print(sorted(placements), len(tasks))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out[0] == f"[({core},)]" and int(out[1]) >= 3
    with pytest.raises(ValueError, match="not available"):
        from rlhf.plumbing.cpus import pin_process

        pin_process([4096])


def test_a_pinned_process_can_move_to_other_cores():
    """The policy pins the process that starts its engine, and a trainer in the same process
    (the benchmark, a laptop demo) then moves to the remaining cores."""
    cores = sorted(os.sched_getaffinity(0))
    first, last = cores[0], cores[-1]
    script = f"""
import os
from rlhf.plumbing.cpus import pin_process
pin_process([{first}])
before = os.sched_getaffinity(0)
pin_process([{last}])
print(sorted(before), sorted(os.sched_getaffinity(0)))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.split("] [") == [f"[{first}", f"{last}]\n"]

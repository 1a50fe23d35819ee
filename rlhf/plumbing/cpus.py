"""CPU placement for processes that share one machine (a laptop, a CPU node, the benchmarks).

On GPU nodes the policy and the trainer have their own devices. On a CPU box they compete for the
same cores, and two thread pools that each try to use every core make both slower (the
oversubscribed OpenMP threads spin and wait on each other). Giving each service its own cores
restores what separate devices give: generation and training really run at the same time.
"""

from __future__ import annotations

import os
from typing import Annotated

from pydantic import AfterValidator


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,6' -> [0, 1, 2, 3, 6] (the Linux cpulist format, as taskset and vLLM take it)."""
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"empty item in CPU list {text!r}")
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{part!r} in CPU list {text!r} is not N or N-M")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise ValueError(f"{part!r} in CPU list {text!r} runs backwards")
        cores.update(range(first, last + 1))
    return sorted(cores)


def _checked(text: str) -> str:
    if text:
        parse_cpu_list(text)
    return text


# A config field holding a cpulist ("" = no placement), checked when the config loads.
CpuList = Annotated[str, AfterValidator(_checked)]


def check_available(cores: list[int]) -> None:
    """Raises ValueError naming the cores this machine doesn't have (a process may widen its own
    affinity again, so the machine's count is the bound, not the current affinity)."""
    count = os.cpu_count() or 1
    missing = [c for c in cores if c >= count]
    if missing:
        raise ValueError(f"CPUs {missing} are not available here (this machine has 0-{count - 1})")


def pin_process(cores: list[int]) -> None:
    """Moves every thread of this process onto `cores` (threads started later inherit it).
    Callers size their thread pools to match (torch.set_num_threads), so the threads don't
    outnumber the cores they may use."""
    check_available(cores)
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:  # e.g. outside the container's cpuset
        raise ValueError(f"cannot run on CPUs {cores}: {exc.strerror}") from exc
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that just ended

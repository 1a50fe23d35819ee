"""Process groups: a service starts in a session of its own, so its whole group can be stopped at
once. vLLM's engine core is a child process that outlives a SIGKILLed parent, and a supervisor
that only kills the pid it started leaves it behind. Stopping is SIGTERM to the service (it
drains), a grace, then SIGKILL to the group until no process of it is left."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

try:  # looked up before any fork: the child only calls it
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _PRCTL = None
_PR_SET_PDEATHSIG = 1


def _own_session_and_parent_death_signal() -> None:
    """In the child before exec: its own session (so its group can be killed as one), and
    SIGTERM when the supervisor dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    os.setsid()
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def launch(argv: Iterable[str], env: Mapping[str, str], log: Path,
           header: str) -> tuple[subprocess.Popen, int]:
    """Starts `argv` as the leader of a new session, stdout and stderr appended to `log` after a
    `header` line. Returns the process and where its output begins in the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"{header}\n".encode())
        out.flush()
        offset = out.tell()
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, cwd=os.getcwd(),
            preexec_fn=_own_session_and_parent_death_signal,
        )
    return popen, offset


async def terminate(popen: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM to the process, then up to `timeout` seconds for it to exit; whether it did."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
    return popen.poll() is not None


async def reap_group(popen: subprocess.Popen, timeout: float = 15.0) -> bool:
    """SIGKILL whatever is left of the process's group (it leads its session, so its pid is the
    group id) and wait until it is gone; False when something of it survived `timeout`."""
    pgid = popen.pid
    kill_group(pgid)
    deadline = time.monotonic() + timeout
    while (popen.poll() is None or group_alive(pgid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        kill_group(pgid)
    return not group_alive(pgid)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (zombies not counted)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(_pgid_of(pid) == pgid and not _is_zombie(pid) for pid in _all_pids())


def exit_text(code: int | None) -> str:
    """A return code as people read it: "exit code 1", "signal SIGKILL", "running"."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _all_pids() -> Iterable[int]:
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                yield int(entry)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "


def _pgid_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")

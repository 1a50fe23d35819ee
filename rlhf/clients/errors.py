"""What a client raises when a call to a peer service fails, with a message that names the
service, the address dialled and, when the service is not there, the command that starts it."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

# Commands that start each service locally (its gRPC port is `--port`).
_SERVE = {"policy": "rlhf serve policy", "reward": "rlhf serve reward",
          "trainer": "rlhf serve trainer"}

_WHAT = {
    grpc.StatusCode.UNAVAILABLE: "is unavailable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "did not answer in time",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "is overloaded",
    grpc.StatusCode.ABORTED: "aborted the call",
}


class CallFailed(RuntimeError):
    """A call to `service` at `address` failed with gRPC status `code` (None when the failure is
    not one call's, e.g. a push short of its quorum); `details` is the server's message."""

    def __init__(self, message: str, *, service: str, address: str,
                 code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.service, self.address, self.code, self.details = service, address, code, details


class GaveUp(CallFailed):
    """A service stayed unreachable (or overloaded, or too slow) longer than the client's retry
    budget, or too few replicas confirmed an adapter push."""


def address_text(addrs: str | Sequence[str]) -> str:
    return addrs if isinstance(addrs, str) else ",".join(addrs)


def start_hint(service: str, addrs: str | Sequence[str]) -> str:
    """How to bring `service` up at `addrs`: the command for a host:port, a check for a name."""
    addrs = [a.strip() for a in address_text(addrs).split(",") if a.strip()]
    command = _SERVE.get(service, f"the {service} service")
    if any(a.startswith("dns:") for a in addrs):
        return f"check that {addrs[0]} resolves to running {service} replicas"
    ports = sorted({a.rpartition(":")[2] for a in addrs if a.rpartition(":")[2].isdigit()})
    if len(ports) == 1:
        return f"start it with `{command} --port {ports[0]}`"
    return f"start each with `{command} --port PORT`"


def describe(service: str, addrs: str | Sequence[str], method: str, code: grpc.StatusCode,
             details: str) -> str:
    """e.g. "policy at 127.0.0.1:50051 is unavailable (Generate: UNAVAILABLE: failed to connect
    ...): start it with `rlhf serve policy --port 50051`"."""
    address = address_text(addrs)
    message = (f"{service} at {address} {_WHAT.get(code, 'failed')} "
               f"({method}: {code.name}: {details or 'no details'})")
    if code == grpc.StatusCode.UNAVAILABLE:
        message += f": {start_hint(service, address)}"
    return message


def call_failed(service: str, addrs: str | Sequence[str], method: str,
                exc: grpc.aio.AioRpcError, *, cls: type[CallFailed] = CallFailed,
                prefix: str = "") -> CallFailed:
    """The client error for a failed gRPC call (raise it `from exc`)."""
    code, details = exc.code(), exc.details() or ""
    return cls(prefix + describe(service, addrs, method, code, details), service=service,
               address=address_text(addrs), code=code, details=details)

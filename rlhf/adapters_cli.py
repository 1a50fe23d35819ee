"""`rlhf adapters list|promote|rollback`: the manual override of what the policy replicas serve.

Every command talks to every replica of `--policy-addr` (a host:port list or a dns:/// name) and
reports each one; a replica that fails is named and the command exits 1, so a half-applied
switch is never silent. promote and rollback need the policy's admin token."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click
import grpc

from rlhf.clients import NO_RETRY, PolicyClient
from rlhf.plumbing.auth import bearer_metadata, token_from
from rlhf.plumbing.config import ClientTLS, ConfigError
from rlhf.v1 import policy_pb2


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _client(policy_addr: tuple[str, ...], tls_ca: Path | None) -> PolicyClient:
    addrs = [a for arg in policy_addr for a in arg.split(",") if a]
    if not addrs:
        raise click.UsageError("--policy-addr is required")
    try:
        return PolicyClient(addrs, ClientTLS(ca_file=tls_ca), timeout=30.0, backoff=NO_RETRY)
    except (ValueError, ConfigError) as exc:
        raise click.UsageError(str(exc)) from None


def _auth(token: str | None, token_file: Path | None) -> tuple[tuple[str, str], ...]:
    try:
        resolved = token_from(token, token_file, "the policy's admin token")
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return bearer_metadata(resolved) if resolved else ()


def _rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


async def _listings(client: PolicyClient, name: str) -> dict[str, policy_pb2.ListAdaptersResponse]:
    endpoints = client.endpoints()
    listed = await asyncio.gather(*(client.list_adapters(name, endpoint=ep, timeout=10.0)
                                    for ep in endpoints))
    return dict(zip(endpoints, listed, strict=True))


def _served(active: policy_pb2.ServedBy) -> str:
    if active.base or not active.adapter.name:
        return "base"
    return f"{active.adapter.name}@v{active.adapter.version}"


def _row(info: policy_pb2.AdapterInfo) -> dict:
    row = {"version": info.adapter.version, "sha256": info.sha256,
           "state": "active" if info.active else ("staged" if info.staged else "kept"),
           "loaded_at": info.loaded_at.ToJsonString() if info.loaded_at.seconds else None,
           "in_flight_requests": info.in_flight_requests}
    if info.staged:
        row["staged_until"] = info.staged_until.ToJsonString()
    return row


def _common(fn):
    fn = click.option("--policy-addr", multiple=True, required=True,
                      help="Policy replicas: host:port (repeatable, or comma separated) or a "
                           "dns:/// name.")(fn)
    fn = click.option("--name", default="policy", show_default=True,
                      help="Adapter name.")(fn)
    fn = click.option("--tls-ca", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                      help="CA of the replicas' TLS certificates (TLS on).")(fn)
    return fn


def _admin(fn):
    fn = click.option("--admin-token", envvar="RLHF_POLICY_ADMIN_TOKEN",
                      help="The policy's admin token (env RLHF_POLICY_ADMIN_TOKEN).")(fn)
    fn = click.option("--admin-token-file", type=click.Path(path_type=Path),
                      help="File holding the admin token.")(fn)
    return fn


@click.group("adapters")
def adapters() -> None:
    """Inspect and switch the adapter versions the policy replicas serve (manual override of
    the trainer and the gateway's canary)."""


@adapters.command("list")
@_common
@click.option("--json", "as_json", is_flag=True, help="One JSON object per replica.")
def list_cmd(policy_addr, name, tls_ca, as_json) -> None:
    """Versions kept by every replica: active, staged (awaiting a commit or a canary) or kept."""

    async def main() -> int:
        async with _client(policy_addr, tls_ca) as client:
            try:
                listings = await _listings(client, name)
            except Exception as exc:  # noqa: BLE001 - CallFailed and friends: reported, exit 1
                _fail(str(exc))
        for endpoint, listing in listings.items():
            rows = [_row(a) for a in listing.adapters]
            if as_json:
                click.echo(json.dumps({"replica": endpoint, "active": _served(listing.active),
                                       "adapters": rows}))
                continue
            click.echo(f"{endpoint}  active: {_served(listing.active)}")
            for r in rows:
                extra = f" until {r['staged_until']}" if "staged_until" in r else ""
                click.echo(f"  v{r['version']:<6} {r['state']:<7} {r['sha256'][:12]}  "
                           f"in flight {r['in_flight_requests']}{extra}")
        return 0

    sys.exit(asyncio.run(main()))


async def _on_all(client: PolicyClient, call, what: str) -> int:
    """Runs `call(stub)` on every replica; prints each outcome; 1 when any failed."""
    failed = 0
    for endpoint in client.endpoints():
        try:
            outcome = await call(client.stub_to(endpoint))
            click.echo(f"{endpoint}: {outcome}")
        except grpc.aio.AioRpcError as exc:
            failed += 1
            click.echo(f"{endpoint}: {what} FAILED: {_rpc_error(exc)}", err=True)
    if failed:
        click.echo(f"error: {what} failed on {failed} of {len(client.endpoints())} replicas; "
                   "run it again (it is idempotent) or see `rlhf adapters list`", err=True)
    return 1 if failed else 0


def _activate(name: str, version: int | None, auth):
    request = (policy_pb2.SetActiveAdapterRequest(base=True) if version is None else
               policy_pb2.SetActiveAdapterRequest(
                   adapter=policy_pb2.AdapterRef(name=name, version=version)))

    async def call(stub) -> str:
        r = await stub.SetActiveAdapter(request, metadata=auth, timeout=30.0)
        return f"{_served(r.previous)} -> {_served(r.active)}"

    return call


@adapters.command("promote")
@_common
@_admin
@click.argument("version", type=click.IntRange(min=1))
def promote(policy_addr, name, tls_ca, admin_token, admin_token_file, version) -> None:
    """Make VERSION active on every replica (commits a staged version; ends its canary)."""
    auth = _auth(admin_token, admin_token_file)

    async def main() -> int:
        async with _client(policy_addr, tls_ca) as client:
            return await _on_all(client, _activate(name, version, auth), f"promote v{version}")

    sys.exit(asyncio.run(main()))


@adapters.command("rollback")
@_common
@_admin
@click.argument("version", type=click.IntRange(min=1), required=False)
@click.option("--to", "to", help="Version to serve instead of an active one (a number or "
                                 "'base'); required then.")
def rollback(policy_addr, name, tls_ca, admin_token, admin_token_file, version, to) -> None:
    """Take VERSION (default: the active one) away from users on every replica: a staged
    version is dropped (its canary ends, it is never promoted); an active one is replaced by
    the version --to names and stays kept, so it can be promoted again."""
    auth = _auth(admin_token, admin_token_file)
    if to is not None and to != "base" and not to.isdigit():
        raise click.UsageError("--to takes a version number or 'base'")

    async def main() -> int:
        async with _client(policy_addr, tls_ca) as client:
            try:
                listings = await _listings(client, name)
            except Exception as exc:  # noqa: BLE001 - CallFailed and friends: reported, exit 1
                _fail(str(exc))
            actives = {(lst.active.adapter.version if not lst.active.base else 0)
                       for lst in listings.values()}
            target = version
            if target is None:
                if len(actives) != 1 or 0 in actives:
                    _fail(f"the replicas serve {sorted(actives)} (0 = base): name the version "
                          "to roll back")
                target = actives.pop()
            infos = [a for lst in listings.values() for a in lst.adapters
                     if a.adapter.version == target]
            if not infos:
                _fail(f"{name}@v{target} is kept by no replica")
            if any(a.staged for a in infos) and not any(a.active for a in infos):
                return await _on_all(client, _drop(name, target, auth), f"drop v{target}")
            if to == "base":
                replacement = None
            elif to is not None:
                replacement = int(to)
            else:
                # The replicas cannot tell a version users were served from one a canary rolled
                # back (both are kept, inactive): the operator names the one to serve.
                kept = [{a.adapter.version for a in lst.adapters if not a.staged}
                        for lst in listings.values()]
                common = sorted((set.intersection(*kept) if kept else set()) - {target})
                _fail(f"name the version to serve instead of v{target} with --to N or --to base "
                      f"(kept by every replica: {', '.join(f'v{v}' for v in common) or 'none'})")
            return await _on_all(client, _activate(name, replacement, auth),
                                 f"rollback v{target}")

    sys.exit(asyncio.run(main()))


def _drop(name: str, version: int, auth):
    async def call(stub) -> str:
        r = await stub.DropAdapter(policy_pb2.DropAdapterRequest(
            adapter=policy_pb2.AdapterRef(name=name, version=version)),
            metadata=auth, timeout=30.0)
        return f"v{version} dropped" if r.dropped else f"v{version} was not kept"

    return call

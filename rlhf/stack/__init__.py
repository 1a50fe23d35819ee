"""The local stack: `rlhf up` (policy, reward, trainer and gateway as supervised processes) and
`rlhf demo` (the whole loop on that stack).

- `plan`: which services, their ports, addresses, flags and per-service config (pure).
- `rundir`: the run dir, stack.yaml, the admin token and the files the plan needs.
- `processes`: process groups: start in a session of its own, SIGTERM, SIGKILL of the group.
- `probes`: gRPC health and HTTP readiness checks.
- `logs`: reading a service's log while it runs.
- `supervisor`: start, wait until ready, restart, stop; stack.json.
- `cli`: the `rlhf up` command.
- `demo`, `demo_stages`, `demo_report`: the `rlhf demo` command, its stages, its output.
"""

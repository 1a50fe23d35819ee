"""A real Prometheus (Debian's package) on 127.0.0.1 scrapes the four services, each started as
its own process on the tiny model, while a short training run goes through TrainerService:

- `up` is 1 for every job, under the job names the Kubernetes ServiceMonitors give them;
- the trainer's step and the policy's active adapter version move with the run, and the gateway
  serves the version the trainer pushed last;
- deploy/monitoring/alerts.yaml loads and every rule evaluates without error on live data;
- every dashboard query runs, and the ones a training run must fill return series.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
import yaml

from rlhf.plumbing.auth import bearer_metadata
from rlhf.v1 import trainer_pb2, trainer_pb2_grpc
from tests.deploy.tools import K8S, MONITORING, grafana_expr, load_module
from tests.fixtures.ports import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMETHEUS = "/usr/bin/prometheus"
TOKEN = "scrape-test-admin-token"
TRAINER_TOKEN = "scrape-test-trainer-token"
STEPS = 3
PROMPTS = ["the cat", "a dog", "hello there", "once upon"]
# Panels a training run with a gateway call must fill (the rest may be empty: no errors, no
# refused pushes, nothing waiting).
MUST_HAVE_DATA = {
    "Step", "Latest adapter version", "Reward", "KL to the reference", "Losses",
    "Clip fraction and entropy", "Logprob mismatch (vLLM vs trainer)", "Staleness",
    "Step time by phase", "Generated tokens / s", "gRPC latency p50 / p99", "Calls by status",
    "Policy queue depth", "KV cache in use", "Gateway latency p50 / p99",
    "Active adapter version per policy replica", "Adapter load latency", "Adapter pushes",
    "Loaded adapter versions",
}


class Proc:
    """A service process whose output goes to a file (a pipe nobody reads could fill up)."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path):
        self.name = name
        self.log = logs / f"{name}.log"
        self.popen = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, marker: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith(marker):
                    return line
            if self.popen.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {marker!r}; output:\n{self.output()[-4000:]}")

    def terminate(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def reap(self) -> None:
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


def _wait(predicate, timeout: float, what: str, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{detail()}")


class PromAPI:
    def __init__(self, port: int):
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def query(self, expr: str) -> list[dict]:
        reply = self.client.get("/api/v1/query", params={"query": expr}).json()
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]

    def values(self, expr: str) -> dict[str, float]:
        return {r["metric"].get("job", ""): float(r["value"][1]) for r in self.query(expr)}

    def rules(self) -> list[dict]:
        reply = self.client.get("/api/v1/rules").json()
        return [rule for group in reply["data"]["groups"] for rule in group["rules"]]


async def test_prometheus_scrapes_services_through_a_training_run(tiny_model_dir, vllm_cpu_env,
                                                                   tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLHF_")}
    env.update(RLHF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    light = {**env, "OMP_NUM_THREADS": "1"}  # the trainer and reward share 2 cores with vLLM
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    ports = {name: (free_port(), free_port()) for name in ("policy", "reward", "trainer")}
    gateway_port, prom_port = free_port(), free_port()
    addr = {name: f"127.0.0.1:{grpc_port}" for name, (grpc_port, _) in ports.items()}
    py = sys.executable

    def service_args(name: str) -> list[str]:
        grpc_port, metrics_port = ports[name]
        return [py, "-m", f"services.{name}", "--port", str(grpc_port), "--metrics-port",
                str(metrics_port), "--data-dir", str(tmp_path / name), "--drain-grace-seconds",
                "2"]

    procs: list[Proc] = []
    try:
        procs.append(Proc("policy", service_args("policy") + [
            "--model", str(tiny_model_dir), "--max-model-len", "512", "--dtype", "float32",
            "--admin-token", TOKEN, "--max-num-seqs", "16"], env, tmp_path))
        procs.append(Proc("reward", service_args("reward") + [
            "--scorer", "rule:length?target=20&unit=chars"], light, tmp_path))
        procs.append(Proc("trainer", service_args("trainer") + [
            "--policy-addr", addr["policy"], "--reward-addr", addr["reward"],
            "--model", str(tiny_model_dir), "--prompts", str(prompts),
            "--policy-admin-token", TOKEN, "--admin-token", TRAINER_TOKEN], light, tmp_path))
        procs.append(Proc("gateway", [
            py, "-m", "gateway", "--port", str(gateway_port), "--policy-addr", addr["policy"],
            "--reward-addr", addr["reward"], "--data-dir", str(tmp_path / "gateway")],
            light, tmp_path))

        targets = {f"rlhf-{name}": f"127.0.0.1:{metrics}" for name, (_, metrics) in ports.items()}
        targets["rlhf-gateway"] = f"127.0.0.1:{gateway_port}"
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(MONITORING / "alerts.yaml")],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [target]}]}
                               for job, target in targets.items()],
        }
        (tmp_path / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        procs.append(Proc("prometheus", [
            PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"], env, tmp_path))
        prom = PromAPI(prom_port)

        def logs() -> str:
            return "\n".join(f"--- {p.name}\n{p.output()[-2500:]}" for p in procs)

        for proc in procs[:3]:
            proc.wait_for_line(f"READY {proc.name}", timeout=300)
        procs[3].wait_for_line("READY gateway", timeout=120)

        def all_up():
            try:
                up = prom.values("up")
            except httpx.HTTPError:
                return None
            return up if set(up) == set(targets) and all(v == 1 for v in up.values()) else None

        _wait(all_up, 60, "every target up", logs)
        assert prom.values("rlhf_trainer_step") == {"rlhf-trainer": 0}
        assert prom.query("rlhf_policy_active_adapter_version") == []  # no adapter yet

        run_cfg = trainer_pb2.RunConfig(algorithm=trainer_pb2.ALGORITHM_GRPO, steps=STEPS,
                                        prompts_per_step=2, samples_per_prompt=2,
                                        max_new_tokens=4, seed=1)
        async with grpc.aio.insecure_channel(addr["trainer"]) as channel:
            stub = trainer_pb2_grpc.TrainerServiceStub(channel)
            auth = bearer_metadata(TRAINER_TOKEN)
            await stub.StartRun(trainer_pb2.StartRunRequest(run_id="scrape", config=run_cfg),
                                metadata=auth)
            async for _ in stub.WatchRun(trainer_pb2.WatchRunRequest(run_id="scrape"),
                                         metadata=auth):
                pass
            run = (await stub.GetRun(trainer_pb2.GetRunRequest(run_id="scrape"),
                                   metadata=auth)).run
        assert run.state == trainer_pb2.RUN_STATE_COMPLETED, (run.message, logs())
        assert run.step == STEPS
        version = run.adapter_version  # one push per step, after the run's initial adapter
        assert version >= STEPS

        # The gateway serves the version the trainer pushed last (and fills its own series).
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}", timeout=120) as client:
            reply = client.post("/v1/best-of-n", json={"prompt": "hello", "n": 2,
                                                       "max_tokens": 4, "seed": 3})
        assert reply.status_code == 200, reply.text
        assert reply.json()["adapter_version"] == version

        def moved():
            step = prom.values("rlhf_trainer_step")
            active = prom.values("max by (job) (rlhf_policy_active_adapter_version)")
            pushed = prom.values("rlhf_trainer_adapter_version")
            served = prom.values("sum by (job) (rlhf_gateway_http_requests_total"
                                 '{route="/v1/best-of-n", status="200"})')
            if (step == {"rlhf-trainer": STEPS} and active == {"rlhf-policy": version}
                    and pushed == {"rlhf-trainer": version} and served == {"rlhf-gateway": 1}):
                return step
            return None

        _wait(moved, 30, "Prometheus to see the run's step and adapter version", logs)
        assert all_up(), "a target went down during the run"

        # Every alerting rule has been evaluated on live data without an error.
        def evaluated():
            rules = prom.rules()
            return rules if rules and all(r["health"] != "unknown" for r in rules) else None

        rules = _wait(evaluated, 30, "the alerting rules to be evaluated")
        assert {r["name"] for r in rules} == {
            r["alert"] for g in yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
            for r in g["rules"]}
        broken = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
        assert not broken, broken
        firing = [a["labels"]["alertname"] for a in
                  prom.client.get("/api/v1/alerts").json()["data"]["alerts"]]
        assert "RlhfServiceUnavailable" not in firing and "RlhfTrainingNaN" not in firing

        # Every dashboard query runs against live data; the training ones return series.
        module = load_module(MONITORING / "dashboard.py", "rlhf_dashboard_scrape")
        committed = K8S / "components" / "monitoring" / "dashboards" / "rlhf-overview.json"
        panels: dict[str, int] = {}
        for title, expr in module.queries(json.loads(committed.read_text())):
            result = prom.query(grafana_expr(expr, rate_interval="1m"))
            panels[title] = panels.get(title, 0) + len(result)
        empty = sorted(t for t in MUST_HAVE_DATA if not panels.get(t))
        assert not empty, f"dashboard panels without data after a run: {empty}"
    finally:
        for proc in procs:  # all drain at once
            proc.terminate()
        for proc in procs:
            proc.reap()

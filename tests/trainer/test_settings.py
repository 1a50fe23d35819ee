"""The stages' one settings style: pydantic models that refuse unknown keys, with a description
on every field, and `rlhf train ...` flags whose defaults, bounds and help come from them."""

from __future__ import annotations

import click
import pytest

from rlhf.plumbing.config import ConfigError
from services.trainer.config import TrainerConfig
from services.trainer.ppo.cli import train_ppo
from services.trainer.ppo.settings import PPOSettings
from services.trainer.rm.cli import train_rm
from services.trainer.rm.settings import RMSettings
from services.trainer.sft.cli import train_sft
from services.trainer.sft.settings import SFTSettings

STAGES = [(PPOSettings, train_ppo), (SFTSettings, train_sft), (RMSettings, train_rm)]


@pytest.mark.parametrize("settings", [PPOSettings, SFTSettings, RMSettings, TrainerConfig])
def test_every_field_is_described_and_unknown_keys_are_refused(settings):
    own = {name: f for name, f in settings.model_fields.items()
           if settings is not TrainerConfig or name in TrainerConfig.__annotations__}
    assert own
    undescribed = [name for name, f in own.items() if not f.description]
    assert not undescribed, undescribed
    assert settings.model_config["extra"] == "forbid"


@pytest.mark.parametrize("settings", [PPOSettings, SFTSettings, RMSettings])
def test_load_names_an_unknown_key_and_its_source(settings, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lerning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"lerning_rate: unknown key") as err:
        settings.load(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(("settings", "command"), STAGES)
def test_flags_take_defaults_bounds_and_help_from_the_settings(settings, command):
    for param in command.params:
        if not isinstance(param, click.Option) or param.name not in settings.model_fields:
            continue
        field = settings.model_fields[param.name]
        assert field.description in (param.help or ""), param.name
        if command is train_ppo:  # flags overlay --config: unset flags stay None
            assert param.default is None, param.name
            continue
        if param.required:
            assert settings.model_fields[param.name].is_required(), param.name
            continue
        if param.multiple:
            continue  # a repeatable flag starts empty; the model fills its default
        default = param.default() if callable(param.default) else param.default
        expected = settings.default(param.name)
        assert default == expected, (param.name, default, expected)
    # A bound written on the model is the flag's too.
    steps = next(p for p in train_ppo.params if p.name == "steps")
    assert isinstance(steps.type, click.IntRange) and steps.type.min == 1


def test_ppo_yaml_then_flags():
    from click.testing import CliRunner

    runner = CliRunner()
    with runner.isolated_filesystem():
        with open("run.yaml", "w") as fh:
            fh.write("steps: 7\nlearning_rate: 0.001\nbogus: 1\n")
        result = runner.invoke(train_ppo, ["--config", "run.yaml", "--steps", "3"])
    assert result.exit_code == 2
    assert "bogus: unknown key" in result.output and "run.yaml" in result.output

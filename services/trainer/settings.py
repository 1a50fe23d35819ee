"""The one settings style of the training stages (`rlhf train sft|rm|ppo`, and the runs the
TrainerService starts): a pydantic model per stage, unknown keys refused, a description on every
field, and click options built from the fields (`option`), so a default, a bound or a help text
is written once, on the model.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Self

import annotated_types as at
import click
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import PydanticUndefined

from rlhf.plumbing.config import ConfigError, read_yaml_mapping


class StageSettings(BaseModel):
    """Base of every stage's settings: unknown keys are errors, and so is an infinite or NaN
    number (a learning rate of inf trains NaN weights)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    what: ClassVar[str] = "settings"  # how messages name these settings

    @classmethod
    def load(cls, yaml_file: Path | None = None, **overrides) -> Self:
        """The settings from a YAML mapping (optional) with `overrides` on top; overrides that
        are None or empty tuples are left out (flags not given). ConfigError names every bad
        key and the source."""
        data: dict[str, Any] = {}
        source = "flags"
        if yaml_file is not None:
            source = str(yaml_file)
            data = read_yaml_mapping(yaml_file, cls.what)
        data.update({k: v for k, v in overrides.items() if v is not None and v != ()})
        try:
            return cls(**data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or '<root>'}: "
                + ("unknown key" if e["type"] == "extra_forbidden"
                   else e["msg"].removeprefix("Value error, "))
                for e in exc.errors()
            )
            raise ConfigError(f"invalid {cls.what} ({source}): {problems}") from None

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field `name` (its factory's value for a computed default)."""
        field = cls.model_fields[name]
        if field.default_factory is not None:
            return field.default_factory()
        return None if field.default is PydanticUndefined else field.default


# The attention projections: what the SFT and DPO stages adapt unless told otherwise.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


def split_target_modules(ctx, param, values: tuple[str, ...]) -> tuple[str, ...]:
    """Click callback of a repeatable, comma-separated --target-module option."""
    names = tuple(n.strip() for v in values for n in v.split(",") if n.strip())
    return names or LORA_TARGET_MODULES


def option(settings: type[StageSettings], name: str, *decls: str, overlay: bool = False,
           **kwargs):
    """A click option for field `name` of `settings`: flag `--name-with-dashes` (or `decls`), its
    type and bounds from the field's annotation and constraints, its help from the field's
    description and its default from the field.

    overlay=True: the option defaults to None (a flag not given leaves the value to a config file
    or the model's default), and the help shows the model's default. `kwargs` override what is
    derived (e.g. a `click.Path` with dir_okay=False)."""
    field = settings.model_fields[name]
    flag_decls = list(decls) or ["--" + name.replace("_", "-")]
    if name not in flag_decls and not any(d.isidentifier() for d in flag_decls):
        flag_decls.append(name)
    kind, multiple = _click_type(field.annotation, field.metadata)
    derived: dict[str, Any] = {"help": field.description}
    if (kind is bool and not any("/" in d for d in flag_decls)
            and "flag_value" not in kwargs and "is_flag" not in kwargs):
        flag = flag_decls[0]
        flag_decls[0] = f"{flag}/--no-{flag[2:]}"
    elif kind is not bool:
        derived["type"] = kind
    if multiple:
        derived["multiple"] = True
    if overlay:
        default = settings.default(name)
        if default not in (None, [], ()):
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            derived["help"] = f"{field.description} [default: {shown}]"
        derived["default"] = None
    elif field.is_required():
        derived["required"] = True
    elif field.default_factory is not None:
        derived["default"] = field.default_factory
    else:
        derived["default"] = field.default
        derived["show_default"] = field.default is not None
    derived.update(kwargs)
    return click.option(*flag_decls, **derived)


def _click_type(annotation, metadata) -> tuple[Any, bool]:
    """(click type, multiple) of a field: Literal -> Choice, bounded int/float -> ranges,
    list[X] -> X repeated; a Path or str stays itself."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return _click_type(args[0], metadata)
    if origin is typing.Annotated:
        return _click_type(args[0], [*metadata, *annotation.__metadata__])
    if origin in (list, tuple):
        return _click_type(args[0], metadata)[0], True
    if origin is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)]), False
    if annotation is Path:
        return click.Path(path_type=Path), False
    if annotation in (int, float):
        bounds: dict[str, Any] = {}
        for m in metadata:
            if isinstance(m, at.Ge):
                bounds["min"] = m.ge
            elif isinstance(m, at.Gt):
                bounds.update(min=m.gt, min_open=True)
            elif isinstance(m, at.Le):
                bounds["max"] = m.le
            elif isinstance(m, at.Lt):
                bounds.update(max=m.lt, max_open=True)
        if not bounds:
            return annotation, False
        rng = click.IntRange if annotation is int else click.FloatRange
        return rng(**bounds), False
    return annotation, False

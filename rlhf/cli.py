"""The `rlhf` command: serve the services, run the stack (`up`, `demo`), run training stages,
prepare models."""

from __future__ import annotations

import click

from rlhf import __version__


class LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so `rlhf --help` stays fast and a
    service's heavy imports (torch, vLLM) load only for that service."""

    def __init__(self, *args, lazy: dict[str, tuple[str, str]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name in self.lazy:
            module_name, attr = self.lazy[name]
            module = __import__(module_name, fromlist=[attr])
            return getattr(module, attr)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, help=__doc__,
             lazy={"up": ("rlhf.stack.cli", "up"), "demo": ("rlhf.stack.demo", "demo"),
                   "loop": ("services.trainer.loop.cli", "loop"),
                   "adapters": ("rlhf.adapters_cli", "adapters")})
@click.version_option(__version__, prog_name="rlhf")
def main() -> None:
    pass


@main.group(
    cls=LazyGroup,
    lazy={
        "policy": ("services.policy.app", "command"),
        "reward": ("services.reward.app", "command"),
        "trainer": ("services.trainer.app", "command"),
        "gateway": ("gateway.cli", "command"),
    },
)
def serve() -> None:
    """Start one service in the foreground (SIGTERM drains it)."""


@main.group(
    cls=LazyGroup,
    lazy={
        "ppo": ("services.trainer.ppo.cli", "train_ppo"),
        "sft": ("services.trainer.sft.cli", "train_sft"),
        "rm": ("services.trainer.rm.cli", "train_rm"),
        "dpo": ("services.trainer.dpo.cli", "train_dpo"),
    },
)
def train() -> None:
    """Training stages as batch jobs."""


@main.group(cls=LazyGroup,
            lazy={"sentiment-pairs": ("services.trainer.rm.sentiment", "sentiment_pairs")})
def data() -> None:
    """Build training data from packaged corpora."""



class _LazyModelGroup(click.Group):
    """`rlhf model ...` from rlhf.models.cli, imported on use (it pulls in torch)."""

    def _target(self) -> click.Group:
        from rlhf.models.cli import model

        return model

    def list_commands(self, ctx):
        return self._target().list_commands(ctx)

    def get_command(self, ctx, name):
        return self._target().get_command(ctx, name)


main.add_command(_LazyModelGroup("model", help="Prepare the default model or a tiny test model."))


if __name__ == "__main__":
    main()

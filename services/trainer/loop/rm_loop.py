"""One round of the reward-model loop, and the service mode that runs rounds on a schedule.

A round: pull the preference pairs newer than the state's cursor from the gateway; when at
least `every_new_pairs` arrived, split them by answer into training and new held-out pairs,
train a new reward model warm-started from the active version, measure it and the active version
on the old and the new held-out pairs, and refuse it when it forgets (old accuracy drops more
than `max_accuracy_drop`) or does not learn (new accuracy below `min_new_accuracy`). Otherwise
push it to every reward replica, activate it, and only then move the cursor."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from rlhf.clients import Backoff, CallFailed, RewardClient
from rlhf.files import dir_lock
from services.trainer.data import Pair, read_rm, write_jsonl
from services.trainer.errors import DataError, TrainError
from services.trainer.loop.evaluate import accuracies
from services.trainer.loop.export import FeedbackPair, LoopError, pull_pairs
from services.trainer.loop.settings import LoopSettings
from services.trainer.loop.state import LoopFolder, LoopState, is_heldout


@dataclass
class RoundResult:
    outcome: Literal["pushed", "refused", "nothing"]
    message: str
    version: str | None = None
    figures: dict = field(default_factory=dict)


class RewardModelLoop:
    def __init__(self, settings: LoopSettings, echo: Callable[[str], None] = print):
        self.s = settings
        self.echo = echo
        self.folder = LoopFolder(settings.folder)

    # ---- one round ------------------------------------------------------------------------

    def run_round(self) -> RoundResult:
        """Runs one round; LoopError when a peer is unreachable or refuses, or data is bad."""
        with dir_lock(self.folder.root / "round"):  # overlapping CronJob runs take turns
            return self._round()

    def _round(self) -> RoundResult:
        s = self.s
        state = self.folder.load_state()
        pairs = pull_pairs(s.gateway_url, s.admin_key, state.cursor, page_size=s.page_size,
                           max_pairs=s.max_pairs_per_round, timeout=s.http_timeout_seconds)
        needed = s.every_new_pairs
        if state.refused and state.refused.get("after") == state.cursor:
            needed = state.refused["pairs"] + s.every_new_pairs
        if len(pairs) < needed:
            return RoundResult("nothing", f"nothing to do: {len(pairs)} new preference pair(s) "
                               f"since the last version; a round needs {needed}")
        train, new_heldout = self._split(pairs)
        old_heldout, seeded = self._old_heldout()
        active, names = asyncio.run(self._versions())
        warm = self._warm_start(active)
        self.echo(f"round: {len(pairs)} new pairs ({len(train)} to train, {len(new_heldout)} "
                  f"held out; {len(old_heldout)} old held out), warm start from {warm}")

        candidate = self._train(train, new_heldout, warm)
        before = accuracies(warm, {"old": old_heldout, "new": new_heldout}, self._device())
        after = accuracies(candidate, {"old": old_heldout, "new": new_heldout}, self._device())
        figures = {"pairs": len(pairs), "train_pairs": len(train),
                   "new_heldout_pairs": len(new_heldout), "old_heldout_pairs": len(old_heldout),
                   "active_version": active or None,
                   "old_accuracy_before": before["old"], "old_accuracy": after["old"],
                   "new_accuracy_before": before["new"], "new_accuracy": after["new"]}
        problems = self._problems(figures)
        if problems:
            shutil.rmtree(candidate, ignore_errors=True)
            state.refused = {"after": state.cursor, "pairs": len(pairs)}
            self.folder.save_state(state)
            message = "refused (no push): " + "; ".join(problems)
            self.folder.log_round({"outcome": "refused", "reasons": problems, **figures})
            return RoundResult("refused", message, figures=figures)

        counter = max([state.counter, *self._counters(names)]) + 1
        version = f"{s.version_prefix}{counter}"
        # Kept before the push: after a crash between the push and the state, the next round
        # warm-starts from this version (the active one) and repeats the round.
        kept = self.folder.keep(version, candidate)
        try:
            asyncio.run(self._push(kept, version, figures, pairs[-1].cursor))
        except LoopError:
            shutil.rmtree(kept, ignore_errors=True)
            raise
        self.folder.add_heldout([*(seeded or []), *new_heldout], s.max_heldout_pairs)
        self.folder.save_state(LoopState(cursor=pairs[-1].cursor, counter=counter,
                                         active=version))
        self.folder.prune(s.keep_versions, version)
        self.folder.log_round({"outcome": "pushed", "version": version, **figures})
        return RoundResult("pushed", f"pushed and activated {version}: accuracy on new held-out "
                           f"pairs {_pct(after['new'])} (active version {_pct(before['new'])}), "
                           f"on old {_pct(after['old'])} (was {_pct(before['old'])})",
                           version, figures)

    def _split(self, pairs: list[FeedbackPair]) -> tuple[list[dict], list[dict]]:
        """(training rows, held-out rows), whole answers on each side, neither side empty."""
        answers = sorted({p.request_id for p in pairs})
        if len(answers) < 2:
            raise LoopError(f"the {len(pairs)} new pairs come from one answer: a round needs "
                            "pairs from at least 2 answers to hold some out")
        held = {a for a in answers if is_heldout(a, self.s.heldout_fraction)}
        if not held:
            held = {answers[0]}
        elif len(held) == len(answers):
            held.discard(answers[0])
        train = [p.row() for p in pairs if p.request_id not in held]
        heldout = [p.row() for p in pairs if p.request_id in held]
        return train, heldout

    def _old_heldout(self) -> tuple[list[dict], list[dict] | None]:
        """(old held-out rows, the seed rows when they are used for the first time)."""
        old = self.folder.heldout()
        if old or self.s.seed_heldout is None:
            return old, None
        try:
            seed = read_rm(self.s.seed_heldout)
        except (DataError, OSError) as exc:
            raise LoopError(f"--seed-heldout {self.s.seed_heldout}: {exc}") from None
        if not all(isinstance(x, Pair) for x in seed):
            raise LoopError(f"--seed-heldout {self.s.seed_heldout} holds ratings, not pairs")
        rows = [{"prompt": x.prompt, "chosen": x.chosen, "rejected": x.rejected,
                 "request_id": ""} for x in seed]
        return rows, rows

    def _warm_start(self, active: str):
        own = self.folder.version_dir(active) if active else None
        if own is not None and own.exists():
            return own
        if self.s.init_model is not None:
            if active:
                self.echo(f"the active reward model {active!r} is not one this loop pushed: "
                          f"warm start from --init-model {self.s.init_model}")
            return self.s.init_model
        raise LoopError(f"the reward service's active version is {active or 'none'!r}, not one "
                        "this loop pushed: give --init-model with the folder to start from")

    def _train(self, train: list[dict], heldout: list[dict], warm):
        from services.trainer.rm.settings import RMSettings
        from services.trainer.rm.train import RewardTrainer

        s = self.s
        work = self.folder.work
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        write_jsonl(work / "train.jsonl", train)
        write_jsonl(work / "heldout.jsonl", heldout)
        out = work / "candidate"
        settings = RMSettings(
            data=work / "train.jsonl", val_file=work / "heldout.jsonl", out=out, init_from=warm,
            backbone=s.backbone, merge=s.merge, epochs=s.epochs, batch_size=s.batch_size,
            lr=s.lr, max_length=s.max_length, seed=s.seed, device=s.device, threads=s.threads,
            progress=False, restart=True)
        threads = _set_threads(s.threads)
        try:
            RewardTrainer(settings, echo=lambda m, **_: self.echo(m)).run()
        except (DataError, TrainError) as exc:
            raise LoopError(f"training the new reward model failed: {exc}") from None
        finally:
            _set_threads(threads)
        shutil.rmtree(out / "checkpoint", ignore_errors=True)  # optimizer state: not pushed
        return out

    def _problems(self, f: dict) -> list[str]:
        s, problems = self.s, []
        if f["old_accuracy"] is not None and f["old_accuracy_before"] is not None \
                and f["old_accuracy"] < f["old_accuracy_before"] - s.max_accuracy_drop:
            problems.append(f"accuracy on old held-out pairs fell from "
                            f"{_pct(f['old_accuracy_before'])} to {_pct(f['old_accuracy'])}, "
                            f"more than max_accuracy_drop {s.max_accuracy_drop:g}")
        if f["new_accuracy"] < s.min_new_accuracy:
            problems.append(f"accuracy on new held-out pairs {_pct(f['new_accuracy'])} is below "
                            f"min_new_accuracy {s.min_new_accuracy:g}")
        return problems

    def _counters(self, names: list[str]) -> list[int]:
        p = self.s.version_prefix
        return [int(n[len(p):]) for n in names if n.startswith(p) and n[len(p):].isdigit()]

    def _device(self) -> str:
        if self.s.device != "auto":
            return self.s.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    # ---- the reward service ---------------------------------------------------------------

    def _client(self) -> RewardClient:
        s = self.s
        return RewardClient(s.reward_addr, s.client_tls, token=s.reward_token,
                            timeout=s.rpc_timeout_seconds,
                            backoff=Backoff(max_seconds=s.retry_max_seconds))

    async def _versions(self) -> tuple[str, list[str]]:
        """(the active version, every kept version's name) of the reward service."""
        async with self._client() as reward:
            try:
                listed = await reward.list_reward_models(timeout=self.s.rpc_timeout_seconds)
            except CallFailed as exc:
                raise LoopError(f"cannot list the reward models: {exc}") from None
        return listed.active, [m.version for m in listed.models]

    async def _push(self, folder, version: str, figures: dict, cursor: str) -> None:
        metadata = {"source": "rlhf loop rm", "cursor": cursor, "pairs": str(figures["pairs"]),
                    "warm_start": str(figures["active_version"] or self.s.init_model)}
        if figures["old_accuracy"] is not None:
            metadata["old_heldout_accuracy"] = f"{figures['old_accuracy']:.4f}"
        async with self._client() as reward:
            try:
                await reward.push_reward_model(folder, version,
                                               heldout_accuracy=figures["new_accuracy"],
                                               metadata=metadata, activate=False,
                                               timeout=self.s.rpc_timeout_seconds)
                await reward.set_active_reward_model(version, timeout=self.s.rpc_timeout_seconds)
            except CallFailed as exc:
                raise LoopError(f"the reward service did not take version {version}: {exc}"
                                ) from None

    # ---- service mode ---------------------------------------------------------------------

    def serve(self, stop: threading.Event) -> None:
        """Runs a round every poll_seconds until `stop` is set; errors are reported and the
        next round tries again."""
        while not stop.is_set():
            try:
                self.echo(self.run_round().message)
            except LoopError as exc:
                self.echo(f"error: {exc}")
            stop.wait(self.s.poll_seconds)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _set_threads(n: int) -> int:
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    return before

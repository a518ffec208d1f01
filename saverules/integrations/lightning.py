"""A Lightning checkpoint callback whose every save is decided by a saverules policy.

::

    from saverules.lightning import SaverulesCheckpoint

    trainer = L.Trainer(max_steps=130, callbacks=[SaverulesCheckpoint("rules/default.toml", dirpath="ckpts")])
    trainer.fit(model, ckpt_path=SaverulesCheckpoint.last_good("ckpts"))

It subclasses Lightning's ``Checkpoint``, so Lightning adds no default
``ModelCheckpoint`` beside it.  One decision per optimizer step (and again at
a step where validation reports metrics); each save goes through
``trainer.save_checkpoint`` into a temporary name, is fsynced, renamed into
place and then described by a saverules manifest, written last.  The policy's
retention runs after each commit.  The decider's state rides in the
checkpoint (``state_dict`` / ``load_state_dict``), so a resumed fit makes the
decisions of an uninterrupted one.  See docs/integrations.md.

Importing this module imports ``lightning``; ``import saverules`` does not.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Checkpoint

from ..distributed import SyncedDecider
from ..engine.decider import Decider
from ..engine.progress import Progress
from ..engine.tiers import TieredDecider
from ..store.fs import fs
from ..store.parts import load_policy, make_decider
from ..store.policyfile import write_policy_file
from . import manifest as fm
from .common import (
    COMMON_OPTIONS,
    ConflictingSettingsError,
    SaveTimer,
    SignalFlags,
    TrainingClock,
    check_callback_options,
    describe,
    note_cost,
    resume_costs,
    say,
)

__all__ = ["SaverulesCheckpoint", "ConflictingSettingsError"]

_OWNER = "SaverulesCheckpoint"


class SaverulesCheckpoint(Checkpoint):
    """Decide every save of a ``lightning.pytorch.Trainer`` with a saverules policy.

    Parameters
    ----------
    policy:
        A :class:`saverules.Policy` or the path of a policy file.
    dirpath:
        Where the ``.ckpt`` files go; default ``[storage].dir`` under the
        trainer's ``default_root_dir``.
    sync_seconds:
        Under DDP, the spacing of the decision syncs for time, signal and
        metric rules; a step-only policy never communicates.  Default 1.0.
    signals:
        The signals an ``on_signal`` rule sees: SIGTERM through Lightning's
        own handler (``trainer.received_sigterm``), the others (default
        SIGUSR1) through a handler installed while the policy has a signal rule.
    """

    def __init__(self, policy: Any = None, dirpath: str | os.PathLike | None = None, **options: Any) -> None:
        self.policy = load_policy(policy, _OWNER)
        self.options = check_callback_options(_OWNER, options, COMMON_OPTIONS)
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"{_OWNER}(dirpath=...) takes a directory path, got {type(dirpath).__name__}")
        self._dirpath = None if dirpath is None else os.fspath(dirpath)
        self.dirpath: str | None = self._dirpath
        self._decider: Decider | TieredDecider | SyncedDecider | None = None  # made when training begins
        self._clock = TrainingClock()
        self._signals = SignalFlags()
        self._restored: dict[str, Any] | None = None
        self._last_step = -1
        self._last_time: float | None = None
        self._sigterm_seen = False
        self._saved_file: tuple | None = None  # (step, path) of the latest save
        #: Steps this process saved, in order.
        self.saved_steps: list = []
        #: Checkpoint files removed by retention in this process.
        self.removed: list = []
        self._warned: set[str] = set()  # checkpoints that failed verification, warned about once
        self._validated: tuple[int, dict[str, float]] | None = None  # (step, metrics) of the last validation
        self._timer = SaveTimer()  # what a save stalls training
        #: The latest save costs this process measured, ``(stall, write)`` seconds, newest last (rank 0's
        #: are the ones every rank's decider plans with).
        self.save_costs: list[tuple[float, float]] = []

    # -- where checkpoints live ----------------------------------------------------

    @staticmethod
    def last_good(dirpath: str | os.PathLike) -> str | None:
        """The newest ``.ckpt`` under ``dirpath`` that verifies against its manifest, for ``fit(ckpt_path=...)``.

        A newer file that does not verify is skipped with a
        :class:`~saverules.integrations.manifest.ManifestWarning`; ``None`` when
        there is nothing to resume from.
        """
        if not os.path.isdir(dirpath):
            return None
        best = fm.last_good(dirpath)
        return None if best is None else str(best.path)

    def _file_name(self, step: int, epoch: int) -> str:
        name = self.policy.storage.render_name(step, epoch)
        return name if name.endswith(".ckpt") else name + ".ckpt"

    # -- set-up ----------------------------------------------------------------------

    def setup(self, trainer, pl_module, stage: str) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, Checkpoint) and c is not self]
        if others:
            names = ", ".join(type(c).__name__ for c in others)
            raise ConflictingSettingsError(
                f"{_OWNER} decides every save, but the Trainer also has {names}, which saves on its own "
                "schedule (every_n_train_steps, every_n_epochs, train_time_interval, save_top_k, save_last): "
                "steps would be saved twice. Remove it and put its schedule in the policy: "
                "every_n_train_steps -> every_steps, every_n_epochs -> epoch_end, train_time_interval -> "
                "every_time, save_top_k -> [retention].keep_best, save_last -> the final rule."
            )
        if self._dirpath is None:
            self.dirpath = os.path.join(trainer.default_root_dir, self.policy.storage.dir)

    def _total(self, trainer) -> int | None:
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # an iterable data set without a length: the total stays unknown
            return None
        return int(total) if isinstance(total, (int, float)) and math.isfinite(total) and total >= 1 else None

    def on_train_start(self, trainer, pl_module) -> None:
        total = self._total(trainer)
        decider = make_decider(self.policy, total, trainer.world_size,
                               {"sync_seconds": self.options["sync_seconds"], "metrics_synced": False})
        self._decider = decider
        self._clock.restore(0.0)
        self._last_step = trainer.global_step
        self._last_time = None
        self._sigterm_seen = False
        if trainer.global_step > 0:
            self._restore(decider, trainer.global_step, trainer.ckpt_path)
        others = tuple(s for s in self.options["signals"] if s != "SIGTERM")
        if decider.watches_signals and others:
            self._signals.install(others)
        if trainer.is_global_zero:
            os.makedirs(self._directory(), exist_ok=True)
            write_policy_file(Path(self._directory()), self.policy)

    def _directory(self) -> str:
        """Where the checkpoints go: set at construction, or from the trainer's root when training starts."""
        if self.dirpath is None:
            raise RuntimeError("saverules: SaverulesCheckpoint has no directory yet: it is set when training starts")
        return self.dirpath

    def _restore(self, decider: Decider | TieredDecider | SyncedDecider, step: int, ckpt_path: str | None) -> None:
        data, self._restored = self._restored, None
        clock, self.save_costs = resume_costs(decider, data, step, _OWNER, ckpt_path)
        self._clock.restore(clock)
        self._last_time = clock

    def state_dict(self) -> dict[str, Any]:
        if self._decider is None:
            return {}
        return {
            "decider": self._decider.state_dict(),
            "clock": self._last_time if self._last_time is not None else self._clock.now(),
            "policy_digest": self.policy.digest,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict) if state_dict else None

    # -- deciding -----------------------------------------------------------------------

    def _progress(self, trainer, *, epoch_end: bool = False, metrics=None, last: bool = False) -> Progress:
        return Progress(*self._fields(trainer, epoch_end=epoch_end, metrics=metrics, last=last))

    def _fields(self, trainer, *, epoch_end: bool = False, metrics=None, last: bool = False) -> tuple:
        """The fields of this step's Progress, in its order (the decider's fields call takes them as they are)."""
        step = trainer.global_step
        total = self._total(trainer)
        epoch = trainer.current_epoch
        is_last = last or trainer.should_stop or (total is not None and step >= total)
        if epoch_end and trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch + 1 >= trainer.max_epochs:
            is_last = True
        signal = self._signals.take()
        if trainer.received_sigterm and not self._sigterm_seen:
            self._sigterm_seen = True
            signal = "SIGTERM"
        return (step, total, epoch, bool(epoch_end), bool(is_last), self._clock.now(), metrics or None, signal)

    def _decide(self, trainer, progress: Progress) -> None:
        if self._decider is None:
            return
        decision = self._decider(progress)
        if decision:
            self._save(trainer, progress, decision.reasons)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._decider is None or trainer.global_step == self._last_step:
            return  # a micro-batch of an accumulated step: no optimizer update yet
        self._last_step = trainer.global_step
        loop = trainer.fit_loop.epoch_loop
        epoch_end = bool(loop.batch_progress.is_last_batch)
        fields = self._fields(trainer, epoch_end=epoch_end)
        decision = self._decider.decide(*fields)  # the fields call: no Progress built on a quiet step
        if decision:
            self._save(trainer, Progress(*fields), decision.reasons)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._decider is None or trainer.sanity_checking or trainer.global_step < 1:
            return
        metrics = fm.clean_metrics(trainer.callback_metrics)
        self._validated = (trainer.global_step, metrics)
        if self._saved_file is not None and self._saved_file[0] == trainer.global_step and trainer.is_global_zero:
            # validated after this step was saved: retention ranks the checkpoint by these metrics
            fm.update_metrics(self._saved_file[1], metrics)
        if self._decider.watches_metrics and metrics or trainer.should_stop:
            self._decide(trainer, self._progress(trainer, metrics=metrics))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._decider is None or trainer.global_step < 1:
            return
        self._decide(trainer, self._progress(trainer, epoch_end=True))

    def on_train_end(self, trainer, pl_module) -> None:
        if self._decider is not None and trainer.global_step >= 1:
            self._decide(trainer, self._progress(trainer, last=True))
        self._signals.uninstall()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        try:
            if isinstance(exception, KeyboardInterrupt) and self._decider is not None and trainer.global_step >= 1:
                # the run ends here: whatever the policy's final rule says for a run of unknown length
                p = self._progress(trainer)
                self._decide(trainer, Progress(p.step, None, p.epoch, p.epoch_end, True, p.time, None, p.signal))
        finally:
            self._signals.uninstall()

    # -- writing -----------------------------------------------------------------------

    def _metrics_of(self, trainer, step: int) -> dict[str, float]:
        """The metrics measured on this step's weights: Lightning keeps the last validation's values in
        ``callback_metrics`` until the next one, so those of a validation at another step are left out."""
        metrics = fm.clean_metrics(trainer.callback_metrics)
        validated = self._validated
        if validated is not None and validated[0] != step:
            metrics = {k: v for k, v in metrics.items() if k not in validated[1]}
        return metrics

    def _save(self, trainer, progress: Progress, reasons) -> None:
        """Save through ``trainer.save_checkpoint`` and time the whole stall: the write, its fsync and
        rename, the manifest and retention (every rank reports its own; the deciders plan with rank 0's)."""
        self._timer.start()
        path = self._write(trainer, progress, reasons)
        seconds = self._timer.stop()
        if seconds is None or self._decider is None:
            return
        self.save_costs = note_cost(self._decider, self.save_costs, seconds)
        if path is not None:
            fm.record_save_costs(path, self.save_costs)

    def _write(self, trainer, progress: Progress, reasons) -> Path | None:
        """Write the checkpoint of ``progress``; its path on the writing process, None elsewhere."""
        step = progress.step
        self._last_time = progress.time
        directory = Path(self._directory())
        final = directory / self._file_name(step, progress.epoch)
        tmp = directory / f".tmp-{final.name}-{os.getpid()}"
        if trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                os.unlink(fm.manifest_path(final))  # a file of the same name is replaced: not a checkpoint meanwhile
            except FileNotFoundError:
                pass
        try:
            trainer.save_checkpoint(str(tmp), weights_only=False)  # every rank takes part; only global zero writes
        except BaseException:
            if trainer.is_global_zero:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            raise
        self.saved_steps.append(step)
        if not trainer.is_global_zero:
            return None
        fs.fsync_file(str(tmp))
        os.replace(tmp, final)
        fs.fsync_dir(str(directory))
        self._saved_file = (step, final)
        metrics = progress.metrics or self._metrics_of(trainer, step)
        fm.write_manifest(final, framework="lightning", step=step, epoch=progress.epoch, time=progress.time,
                          reasons=reasons, metrics=metrics, final="final" in reasons or bool(progress.is_last),
                          policy_digest=self.policy.digest)
        say(describe(step, reasons) + f" -> {final}")
        for info, why in fm.apply_retention(directory, self.policy, "lightning", final, (), self._warned):
            self.removed.append(info.name)
            say(f"removed {info.name} (step {info.step}): {why}")
        return final

"""A Hugging Face ``Trainer`` callback whose every save is decided by a saverules policy.

::

    from saverules.transformers import SaverulesCallback, last_good_checkpoint

    trainer = Trainer(model, args=TrainingArguments("out", save_strategy="no", ...),
                      callbacks=[SaverulesCallback("rules/default.toml")])
    trainer.train(resume_from_checkpoint=last_good_checkpoint("out"))

The callback decides once per optimizer step (and again at a step where the
trainer logs metrics or evaluates), sets ``control.should_save``, writes a
saverules manifest into each ``checkpoint-N`` directory after the trainer
wrote it, and applies the policy's retention.  Its decider state rides in
``trainer_state.json`` through the trainer's stateful-callback mechanism, so a
resumed run makes the decisions of an uninterrupted one.  See
docs/integrations.md.

Importing this module imports ``transformers``; ``import saverules`` does not.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..distributed import SyncedDecider
from ..engine.decider import Decider
from ..engine.progress import Decision, Progress
from ..engine.tiers import TieredDecider
from ..store.parts import load_policy, make_decider
from ..store.policyfile import write_policy_file
from . import manifest as fm
from .common import (
    COMMON_OPTIONS,
    ConflictingSettingsError,
    SaveTimer,
    SignalFlags,
    TrainingClock,
    agreed_signals,
    check_callback_options,
    describe,
    note_cost,
    resume_costs,
    say,
)

__all__ = ["SaverulesCallback", "last_good_checkpoint", "best_checkpoint", "ConflictingSettingsError"]

_OWNER = "SaverulesCallback"
_OPTIONS = {**COMMON_OPTIONS, "stop_on_sigterm": True}
#: Logged values that are not metrics of the model.
_NOT_METRICS = frozenset({"epoch", "step", "total_flos"})


def last_good_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir`` whose manifest verifies, for ``resume_from_checkpoint``.

    A newer directory that does not verify (half-written, truncated, no
    manifest) is skipped with a :class:`~saverules.integrations.manifest.ManifestWarning`.
    ``None`` when there is nothing to resume from.
    """
    if not os.path.isdir(output_dir):
        return None
    best = fm.last_good(output_dir)
    if best is None:
        return None
    if not os.path.exists(os.path.join(best.path, "optimizer.pt")):
        import warnings

        warnings.warn(
            f"saverules: {best.path} holds the model only (written with save_only_model=True?): no optimizer or "
            "scheduler state. Resuming from it restarts the optimizer (Adam's moments) and the learning-rate "
            "schedule; it continues the weights, not the training run. Leave save_only_model False to resume runs.",
            fm.ManifestWarning, stacklevel=2,
        )
    return str(best.path)


def best_checkpoint(output_dir: str | os.PathLike, metric: str, mode: str = "min") -> str | None:
    """The verified ``checkpoint-N`` under ``output_dir`` with the best ``metric`` in its manifest.

    ``mode`` is ``"min"`` or ``"max"``; on a tie the earlier step wins.  ``None``
    when no verified checkpoint records the metric.  What
    ``load_best_model_at_end`` would load, for a run whose saves the policy decides.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"best_checkpoint(mode=...) takes 'min' or 'max', got {mode!r}")
    if not os.path.isdir(output_dir):
        return None
    scored = [(i.metrics[metric], i.step, str(i.path)) for i in fm.list_checkpoints(output_dir)
              if i.ok and i.framework in ("transformers", None) and i.metrics and metric in i.metrics]
    if not scored:
        return None
    best = min(scored, key=lambda t: (t[0] if mode == "min" else -t[0], t[1]))
    return best[2]


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _value(setting: Any) -> str:
    return str(getattr(setting, "value", setting))


def _epoch(epoch: float | None):
    """(0-based epoch of the step, whether the step ends it) from ``state.epoch``.

    The Trainer sets ``state.epoch = epoch + (step + 1) / steps_in_epoch``, a
    whole number exactly at the last update of an epoch.
    """
    if epoch is None:
        return 0, False
    whole = round(epoch)
    end = whole >= 1 and abs(epoch - whole) < 1e-9
    return max(0, math.ceil(epoch - 1e-9) - 1), end


class SaverulesCallback(TrainerCallback, ExportableState):
    """Decide every save of a ``transformers.Trainer`` with a saverules policy.

    Parameters
    ----------
    policy:
        A :class:`saverules.Policy` or the path of a policy file.
    sync_seconds:
        Under DDP, the spacing of the decision syncs for time, signal and
        metric rules (see :class:`saverules.distributed.SyncedDecider`); a
        step-only policy never communicates.  Default 1.0.
    signals:
        The signals recorded for ``on_signal`` rules, default SIGTERM and
        SIGUSR1.  Handlers are installed only when the policy has a signal rule.
    stop_on_sigterm:
        After the step that follows a SIGTERM (saved when the policy says so),
        stop training cleanly: ``trainer.train()`` returns.  Default True.
    """

    def __init__(self, policy: Any = None, **options: Any) -> None:
        self.policy = load_policy(policy, _OWNER)
        self.options = check_callback_options(_OWNER, options, _OPTIONS)
        self._decider: Decider | TieredDecider | SyncedDecider | None = None  # made when training begins
        self._clock = TrainingClock()
        self._signals = SignalFlags()
        self._step_progress: Progress | None = None
        self._step_fields: tuple | None = None  # this step's Progress fields; the Progress is built when needed
        self._step_metrics: dict[str, float] = {}
        self._pending: tuple | None = None  # (step, reasons, time) of the save the trainer is about to write
        self._last_time: float | None = None  # the clock at the latest decided save
        self._timer = SaveTimer()  # what the save the callback asked for stalls training
        #: The latest save costs this process measured, ``(stall, write)`` seconds, newest last (rank 0's
        #: are the ones every rank's decider plans with).
        self.save_costs: list[tuple[float, float]] = []
        #: Steps this process saved, in order.
        self.saved_steps: list = []
        #: Checkpoint directories removed by retention in this process.
        self.removed: list = []
        self._warned: set[str] = set()  # checkpoints that failed verification, warned about once

    # -- the stateful-callback mechanism ---------------------------------------

    def state(self) -> dict:
        args: dict[str, Any] = {}
        source = self.policy.source
        if source and not source.startswith("<") and os.path.exists(source):
            args = {"policy": source, **{k: list(v) if isinstance(v, tuple) else v for k, v in self.options.items()}}
        return {
            "args": args,
            "attributes": {
                "saverules_state": None if self._decider is None else {
                    "decider": self._decider.state_dict(),
                    "clock": self._last_time if self._last_time is not None else self._clock.now(),
                    "policy_digest": self.policy.digest,
                },
            },
        }

    # -- settings that would save or delete on their own ---------------------------

    def _check_settings(self, args) -> None:
        strategy = _value(args.save_strategy)
        if strategy != "no":
            raise ConflictingSettingsError(
                f"{_OWNER} decides every save, but TrainingArguments(save_strategy={strategy!r}) makes the Trainer "
                "save on its own as well, so steps would be saved twice or outside the policy. Set "
                "save_strategy=\"no\" and put the schedule in the policy: save_steps=N -> an every_steps rule "
                "(every = N, or a share such as \"25%\"), save_strategy=\"epoch\" -> epoch_end, "
                "save_strategy=\"best\" -> improved."
            )
        if getattr(args, "restore_callback_states_from_checkpoint", False) and not self.state()["args"]:
            raise ConflictingSettingsError(
                "TrainingArguments(restore_callback_states_from_checkpoint=True) rebuilds callbacks from their "
                f"saved arguments, and {_OWNER} was given a Policy object, not a file it can be rebuilt from. "
                f"Pass the policy as a path, or leave that setting False: {_OWNER} restores its own state "
                "from the checkpoint either way."
            )
        if getattr(args, "load_best_model_at_end", False):
            metric = getattr(args, "metric_for_best_model", None) or "loss"
            name = metric if metric.startswith("eval_") else f"eval_{metric}"
            mode = "max" if getattr(args, "greater_is_better", None) else "min"
            raise ConflictingSettingsError(
                "TrainingArguments(load_best_model_at_end=True) needs the Trainer to save on its own schedule "
                f"(save_strategy equal to eval_strategy), and {_OWNER} needs save_strategy=\"no\", so the Trainer "
                "would never know a best checkpoint to load. Leave load_best_model_at_end False; keep the best in "
                f"the policy ([[rules]] kind = \"improved\", metric = \"{name}\", mode = \"{mode}\", and "
                f"[retention.keep_best] metric = \"{name}\", mode = \"{mode}\"), and after trainer.train() load "
                "saverules.transformers.best_checkpoint(output_dir, "
                f"\"{name}\", \"{mode}\") with trainer._load_from_checkpoint(path) or from its model.safetensors."
            )
        if args.save_total_limit is not None:
            raise ConflictingSettingsError(
                f"TrainingArguments(save_total_limit={args.save_total_limit}) makes the Trainer delete checkpoints "
                f"by itself, without checking them; {_OWNER} applies the policy's [retention] table instead. "
                f"Remove save_total_limit and set keep_last = {args.save_total_limit} under [retention]."
            )

    def on_init_end(self, args, state, control, **kwargs):
        self._check_settings(args)

    # -- deciding ---------------------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._check_settings(args)
        # the Trainer gathers its logged values across ranks: metrics_synced
        decider = make_decider(self.policy, state.max_steps or None, args.world_size,
                               {"sync_seconds": self.options["sync_seconds"], "metrics_synced": True})
        self._decider = decider
        self._clock.restore(0.0)
        self._last_time = None
        if state.global_step > 0:
            self._restore(decider, args, state)
        if decider.watches_signals and self.options["signals"]:
            self._signals.install(self.options["signals"])
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)
            write_policy_file(Path(args.output_dir), self.policy)

    def _restore(self, decider: Decider | TieredDecider | SyncedDecider, args, state) -> None:
        saved = (state.stateful_callbacks or {}).get(type(self).__name__)
        if isinstance(saved, list):
            saved = saved[0] if saved else None
        data = (saved or {}).get("attributes", {}).get("saverules_state") if isinstance(saved, dict) else None
        path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        clock, self.save_costs = resume_costs(decider, data, state.global_step, _OWNER, path)
        self._clock.restore(clock)
        self._last_time = clock

    def _decide(self, progress: Progress, control, decision: Decision | None = None) -> None:
        decider = self._decider
        if decider is None:
            return
        if decision is None:  # given: decided by the fields call
            decision = decider(progress)
        if decision:
            if not control.should_save:  # the first request at this step: the stall starts here
                self._timer.start()
            control.should_save = True
            self._pending = (progress.step, decision.reasons, progress.time)
            self._last_time = progress.time
        if self.options["stop_on_sigterm"] and "SIGTERM" in agreed_signals(decider, progress.signal):
            control.should_training_stop = True

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        epoch, epoch_end = _epoch(state.epoch)
        total = state.max_steps or None
        self._step_metrics = {}
        signal = self._signals.take()
        self._step_fields = (step, total, epoch, epoch_end, bool(total is not None and step >= total),
                             self._clock.now(), None, signal)
        self._step_progress = None
        decider = self._decider
        if decider is None:
            return
        # the fields call decides without building a Progress on a quiet step (docs/performance.md)
        decision = decider.decide(*self._step_fields)
        if decision or agreed_signals(decider, signal):
            progress = self._progress_of_step()
            if progress is not None:
                self._decide(progress, control, decision)

    def _progress_of_step(self) -> Progress | None:
        """This step's Progress, built from its fields the first time it is needed."""
        if self._step_progress is None and self._step_fields is not None:
            self._step_progress = Progress(*self._step_fields)
        return self._step_progress

    def on_log(self, args, state, control, logs=None, **kwargs):
        p = self._progress_of_step()
        if self._decider is None or p is None or state.global_step != p.step or not logs or "train_runtime" in logs:
            return
        self._step_metrics.update(fm.clean_metrics({k: v for k, v in logs.items() if k not in _NOT_METRICS}))
        if self.saved_steps and self.saved_steps[-1] == p.step and args.should_save:
            # evaluated after this step was saved (an epoch-end evaluation): retention ranks it by these metrics
            fm.update_metrics(os.path.join(args.output_dir, f"checkpoint-{p.step}"), self._step_metrics)
        if self._decider.watches_metrics and self._step_metrics:
            # a repeated decision at this step, with its metrics (the step is never saved twice)
            self._decide(Progress(p.step, p.total_steps, p.epoch, p.epoch_end, p.is_last, p.time,
                                  dict(self._step_metrics), False), control)

    def on_evaluate(self, args, state, control, **kwargs):
        if control.should_save and self._timer.started is not None:
            # the Trainer evaluates at a step before it saves it: the save's stall starts after the evaluation
            self._timer.start()

    # -- after the trainer wrote a checkpoint -------------------------------------

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        if self._pending is not None and self._pending[0] == step:
            _, reasons, clock = self._pending
        else:  # saved on someone else's request: the decider learns of it
            reasons, clock = ("requested",), self._clock.now()
            if self._decider is not None:
                self._decider.note_save(step, clock)
        self._pending = None
        self.saved_steps.append(step)
        if args.world_size > 1:
            _barrier()  # every rank has written its part (its rng_state_R.pth) before the manifest lists the files
        path = os.path.join(args.output_dir, f"checkpoint-{step}")
        if args.should_save:
            self._describe(args, state, path, step, reasons, clock)
        seconds = self._timer.stop()
        if seconds is not None and self._decider is not None:
            # every rank reports its own; under DDP the deciders plan with rank 0's (SyncedDecider.note_cost)
            self.save_costs = note_cost(self._decider, self.save_costs, seconds)
            if args.should_save:
                fm.record_save_costs(path, self.save_costs)

    def _describe(self, args, state, path: str, step: int, reasons: tuple[str, ...], clock: float | None) -> None:
        """On the writing process: the manifest, last, then the policy's retention."""
        say(describe(step, reasons))
        epoch, _ = _epoch(state.epoch)
        fm.write_manifest(
            path, framework="transformers", step=step, epoch=epoch, time=clock, reasons=reasons,
            metrics=self._step_metrics, final="final" in reasons or step >= (state.max_steps or math.inf),
            policy_digest=self.policy.digest,
        )
        protect = [state.best_model_checkpoint] if state.best_model_checkpoint else []
        for info, why in fm.apply_retention(args.output_dir, self.policy, "transformers", path, protect, self._warned):
            self.removed.append(info.name)
            say(f"removed {info.name} (step {info.step}): {why}")

    def on_train_end(self, args, state, control, **kwargs):
        self._signals.uninstall()

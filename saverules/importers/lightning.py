"""Lightning ``ModelCheckpoint(...)`` -> policy, and a model of the callback's own schedule.

The call is parsed with :mod:`ast` and its arguments read with
:func:`ast.literal_eval`: nothing in it is evaluated, imported or called.
``train_time_interval`` may be ``timedelta(...)`` with literal keyword arguments.

The callback's schedule, as Lightning 2.6 implements it (``ModelCheckpoint``):

- triggers: with none of ``every_n_train_steps``, ``every_n_epochs``, ``train_time_interval``
  given, ``every_n_epochs=1``; ``every_n_train_steps=n`` fires where ``global_step % n == 0``;
  ``every_n_epochs=k`` fires at the end of every k-th epoch (a run that stops mid-epoch ends
  that epoch too); the three are mutually exclusive.
- at a trigger without ``monitor``: ``save_top_k=-1`` writes a checkpoint and keeps them all,
  ``1`` writes one and deletes the one before, ``0`` writes none; with ``monitor`` it writes
  one when the value ranks among the best ``save_top_k`` (all of them for ``-1``).
- ``save_last=True`` (or ``"link"``) also writes ``last.ckpt`` at each trigger, and at the end
  of training only if it never wrote one: a run whose last step is no trigger does not
  have its last step saved.
"""
from __future__ import annotations

import ast
from typing import Any

from .draft import (
    Draft,
    Refused,
    TrainerSchedule,
    epoch_rule,
    interval_rule,
    keep_last_note,
    keep_newest,
    multiples,
    run_shape,
)

SOURCE = "ModelCheckpoint"
_SCHEDULE = ("every_n_train_steps", "every_n_epochs", "train_time_interval", "save_top_k", "monitor", "mode",
             "save_last", "save_on_train_epoch_end")
#: Arguments that name or shape the files, not when they are written.
_FILES = ("dirpath", "filename", "verbose", "save_weights_only", "auto_insert_metric_name",
          "enable_version_counter", "save_on_exception")
_TIMEDELTA_UNITS = {"weeks": 604800, "days": 86400, "hours": 3600, "minutes": 60, "seconds": 1,
                    "milliseconds": 0.001, "microseconds": 0.000001}


def _callee(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _callee(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _timedelta_seconds(node: ast.expr) -> float:
    if not (isinstance(node, ast.Call) and _callee(node.func).split(".")[-1] == "timedelta"):
        raise ValueError("must be timedelta(...) with literal keyword arguments, e.g. timedelta(minutes=30)")
    if node.args:
        raise ValueError("timedelta(...) takes keyword arguments here (days=, hours=, minutes=, seconds=)")
    seconds = 0.0
    for kw in node.keywords:
        if kw.arg not in _TIMEDELTA_UNITS:
            raise ValueError(f"timedelta has no argument {kw.arg!r}")
        value = ast.literal_eval(kw.value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"timedelta({kw.arg}=...) must be a number")
        seconds += value * _TIMEDELTA_UNITS[kw.arg]
    return seconds


def parse(text: str) -> dict[str, Any]:
    """The keyword arguments of a ``ModelCheckpoint(...)`` call, read without evaluating anything."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (RecursionError, MemoryError):
        raise Refused(SOURCE, [("--from-lightning", "is nested too deeply to read")]) from None
    except SyntaxError as exc:
        raise Refused(SOURCE, [("--from-lightning", f"is not a Python call ({exc.msg}, column {exc.offset}); "
                                                    "pass e.g. 'ModelCheckpoint(every_n_train_steps=40)'")]) from None
    call = tree.body
    if not (isinstance(call, ast.Call) and _callee(call.func).split(".")[-1] == "ModelCheckpoint"):
        raise Refused(SOURCE, [("--from-lightning", "must be a single ModelCheckpoint(...) call with literal "
                                                    "keyword arguments; nothing else is read, and nothing is run")])
    problems: list[tuple[str, str]] = []
    if call.args:
        problems.append(("positional arguments", "pass every argument by keyword (dirpath=..., ...)"))
    out: dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None:
            problems.append(("**kwargs", "unpacking is not read: write the arguments out"))
            continue
        try:
            out[kw.arg] = (_timedelta_seconds(kw.value) if kw.arg == "train_time_interval"
                           else ast.literal_eval(kw.value))
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
            why = str(exc) if kw.arg == "train_time_interval" else "only literal values are read (numbers, strings, True/False/None), never code"
            problems.append((kw.arg, why))
    if problems:
        raise Refused(SOURCE, problems)
    return out


def _int_arg(args: dict[str, Any], name: str, problems: list[tuple[str, str]], low: int) -> int | None:
    value = args.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        problems.append((name, f"{value!r} must be a whole number >= {low}"))
        return None
    return value


def convert(args: dict[str, Any], origin: str, total_steps: int | None = None,
            steps_per_epoch: int | None = None) -> Draft:
    problems: list[tuple[str, str]] = []
    unknown = sorted(set(args) - set(_SCHEDULE) - set(_FILES))
    for name in unknown:
        problems.append((name, "is not a ModelCheckpoint argument this converter knows"))
    steps = _int_arg(args, "every_n_train_steps", problems, 0)
    epochs = _int_arg(args, "every_n_epochs", problems, 0)
    seconds = args.get("train_time_interval")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0):
        problems.append(("train_time_interval", f"{seconds!r} must be a positive timedelta(...)"))
        seconds = None
    top_k = args.get("save_top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < -1:
        problems.append(("save_top_k", f"{top_k!r} must be -1 (keep all), 0 or a positive count"))
        top_k = 1
    monitor = args.get("monitor")
    if monitor is not None and not isinstance(monitor, str):
        problems.append(("monitor", f"{monitor!r} is not a metric name"))
    mode = args.get("mode", "min")
    if mode not in ("min", "max"):
        problems.append(("mode", f"{mode!r} must be 'min' or 'max'"))
    save_last = args.get("save_last")
    if save_last not in (None, True, False, "link"):
        problems.append(("save_last", f"{save_last!r} must be True, False, None or 'link'"))
    if args.get("save_on_train_epoch_end") not in (None, True, False):
        problems.append(("save_on_train_epoch_end", "must be True, False or None"))
    if steps is None and epochs is None and seconds is None:
        epochs = 1  # Lightning's default trigger
    triggers = [n for n, v in (("every_n_train_steps", steps), ("every_n_epochs", epochs),
                               ("train_time_interval", seconds)) if v]
    if len(triggers) > 1:
        problems.append((", ".join(triggers), "are mutually exclusive in ModelCheckpoint: keep one"))
    if not triggers:
        problems.append(("every_n_train_steps / every_n_epochs", "0 turns saving off: there is nothing to convert"))
    if monitor is None and top_k not in (-1, 0, 1):
        problems.append(("save_top_k", f"{top_k} needs a monitor (ModelCheckpoint refuses it without one)"))
    if top_k == 0 and not save_last:
        problems.append(("save_top_k", "0 without save_last writes no checkpoint: there is nothing to convert"))
    if problems:
        raise Refused(SOURCE, problems)
    last = bool(save_last)
    ranked = monitor is not None and top_k > 0

    def trainer(run_total: int, spe: int | None) -> TrainerSchedule:
        if seconds:
            return TrainerSchedule(why_not="train_time_interval follows the wall clock: not modelled")
        if ranked:
            return TrainerSchedule(why_not=f"save_top_k={top_k} with monitor={monitor!r} depends on the metric")
        if steps:
            fired = multiples(steps, run_total)
        elif spe is None or epochs is None:
            return TrainerSchedule(why_not="every_n_epochs needs the epoch length: give --steps-per-epoch")
        else:
            ends = sorted(set(multiples(spe, run_total)) | {run_total})  # the last, maybe partial, epoch ends too
            fired = [s for s in ends if (-(-s // spe)) % epochs == 0]
        if not fired:
            return TrainerSchedule((run_total,), (run_total,)) if last else TrainerSchedule()
        kept = keep_newest(fired, None if top_k == -1 else 1)
        return TrainerSchedule(tuple(fired), kept)

    draft = Draft(SOURCE, origin, trainer)
    if steps:
        interval_rule(draft, steps, total_steps, f"every_n_train_steps = {steps}")
    elif epochs:
        epoch_rule(draft, epochs, total_steps, steps_per_epoch, f"every_n_epochs = {epochs}"
                   + ("" if "every_n_epochs" in args else " (ModelCheckpoint's default trigger)"))
        if args.get("save_on_train_epoch_end") is False:
            draft.notes.append("save_on_train_epoch_end = False: Lightning saves after validation; the policy "
                               "saves at the epoch end the loop reports")
    else:
        draft.rule({"kind": "every_time", "every": _duration(float(seconds or 0))},
                   "train_time_interval: a save when this much training time has passed since the last save "
                   "(Lightning counts from the last check, in wall-clock time)")
    if ranked:
        draft.rules[0][1].append(
            f"monitor = {monitor!r}, save_top_k = {top_k}: ModelCheckpoint writes at a trigger only when the value "
            "ranks among the best; the policy writes at every trigger and retention keeps the best")
        draft.retention["keep_last"] = 2
        draft.retention["keep_best"] = {"metric": monitor, "mode": mode, "n": top_k}
        draft.retention_notes.append(f"save_top_k = {top_k}: the best {top_k} by {monitor} are kept, and the "
                                     "newest 2 (save_last's last.ckpt, and one before it as `check --strict` asks)")
    elif top_k == -1:
        draft.notes.append("save_top_k = -1: every checkpoint is kept, so there is no [retention] table")
    else:
        keep_last_note(draft, 1, f"save_top_k = {top_k}" + (", save_last" if last else ""))
    if last:
        draft.notes.append("save_last: last.ckpt holds the newest save; ModelCheckpoint does not update it at "
                           "the last step unless that step is a trigger (the policy's final does)")
    files = sorted(set(args) & set(_FILES))
    if files:
        draft.notes.append(f"{', '.join(files)}: how the files are named and filled, not when; left to "
                           "[storage] and the store (see docs/checkpoints.md)")
    run_shape(draft, total_steps, steps_per_epoch, "--total-steps")
    return draft


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"

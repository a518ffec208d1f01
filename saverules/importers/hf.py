"""Hugging Face ``TrainingArguments`` -> policy, and a model of the Trainer's own schedule.

The Trainer's schedule, as transformers 5.x implements it (``DefaultFlowCallback``,
``TrainerState.compute_steps``, ``rotate_checkpoints``):

- ``save_strategy="steps"``: a checkpoint at every step where ``global_step % save_steps == 0``,
  and one at the last step (``global_step >= max_steps``).  A ``save_steps`` below 1 is a
  share of the run, resolved once as ``math.ceil(max_steps * save_steps)`` in floating point.
- ``"epoch"``: a checkpoint at every epoch end, the run's last (maybe partial) epoch included.
- ``"best"``: a checkpoint at an evaluation whose ``metric_for_best_model`` beats the best so far.
- ``"no"``: none.
- ``save_total_limit=N``: after each save, the newest N are kept (steps order), and the best
  checkpoint too when ``load_best_model_at_end`` tracks one.
"""
from __future__ import annotations

import json
import math
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
from .pickled import NotTrainingArgs, read_training_args

SOURCE = "TrainingArguments"


def read(path: str) -> dict[str, Any]:
    """The fields of a ``TrainingArguments`` from its JSON or a saved ``training_args.bin``."""
    with open(path, "rb") as f:
        data = f.read()
    if data.lstrip()[:1] in (b"{", b"[") or path.endswith(".json"):
        try:
            fields = json.loads(data)
        except ValueError as exc:
            raise Refused(SOURCE, [(path, f"is not valid JSON ({exc}); pass the output of "
                                          "TrainingArguments.to_json_string() or a training_args.bin")]) from None
        if not isinstance(fields, dict):
            raise Refused(SOURCE, [(path, "holds JSON that is not an object of TrainingArguments fields")])
        return fields
    try:
        return read_training_args(data)[1]
    except NotTrainingArgs as exc:
        raise Refused(SOURCE, [(path, f"is {exc}; pass the output of TrainingArguments.to_json_string() "
                                      "or a training_args.bin that Trainer saved")]) from None


def _resolve_share(ratio: float, total: int) -> int:
    return math.ceil(total * ratio)  # as TrainerState.compute_steps does, in floating point


def convert(fields: dict[str, Any], origin: str, total_steps: int | None = None,
            steps_per_epoch: int | None = None) -> Draft:
    problems: list[tuple[str, str]] = []
    strategy = fields.get("save_strategy", "steps")
    save_steps = fields.get("save_steps", 500)
    limit = fields.get("save_total_limit")
    best_at_end = fields.get("load_best_model_at_end", False) is True
    metric = fields.get("metric_for_best_model")
    greater = fields.get("greater_is_better")
    max_steps = fields.get("max_steps", -1)
    epochs = fields.get("num_train_epochs", 3.0)

    if fields.get("save_on_each_node") is True:
        problems.append(("save_on_each_node", "true writes a copy on every node; a policy decides when to "
                                               "save, not where: set it to false (the main node saves)"))
    if strategy not in ("no", "steps", "epoch", "best"):
        problems.append(("save_strategy", f"{strategy!r} is not one of 'no', 'steps', 'epoch', 'best'"))
    steps_ok = isinstance(save_steps, (int, float)) and not isinstance(save_steps, bool) and save_steps > 0
    if strategy == "steps" and not steps_ok:
        problems.append(("save_steps", f"{save_steps!r} is not a positive number of steps or share of the run"))
    if steps_ok and save_steps >= 1 and save_steps != int(save_steps):
        problems.append(("save_steps", f"{save_steps!r} is above 1 but not a whole number of steps"))
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        problems.append(("save_total_limit", f"{limit!r} is not a whole number"))
    if (best_at_end or strategy == "best") and metric is None:
        metric = "loss"  # as TrainingArguments.__post_init__ defaults it
    if metric is not None and not isinstance(metric, str):
        problems.append(("metric_for_best_model", f"{metric!r} is not a metric name"))
    if greater is not None and not isinstance(greater, bool):
        problems.append(("greater_is_better", f"{greater!r} is not true or false"))
    if problems:
        raise Refused(SOURCE, problems)

    # the run's length: max_steps wins, as in the Trainer; else epochs x steps per epoch
    total = total_steps
    if total is None and isinstance(max_steps, int) and max_steps > 0:
        total = max_steps
    if total is None and steps_per_epoch is not None and isinstance(epochs, (int, float)) and epochs > 0:
        total = math.ceil(epochs * steps_per_epoch)
    if strategy == "steps" and save_steps < 1 and total is None:
        raise Refused(SOURCE, [("save_steps", f"{save_steps!r} is a share of the run, and the run's length is "
                                              "unknown (max_steps is not set): give --total-steps, or "
                                              "--steps-per-epoch to go with num_train_epochs")])

    best_name = best_mode = None
    if metric is not None:
        best_name = metric if metric.startswith("eval_") else f"eval_{metric}"
        if greater is None:
            greater = metric not in ("loss", "eval_loss")  # the TrainingArguments default
        best_mode = "max" if greater else "min"

    def trainer(run_total: int, spe: int | None) -> TrainerSchedule:
        if strategy == "no":
            return TrainerSchedule()
        if strategy == "best":
            return TrainerSchedule(why_not="save_strategy='best' saves at evaluations that improve "
                                           f"{best_name}: it depends on the metric")
        if strategy == "epoch":
            if spe is None:
                return TrainerSchedule(why_not="save_strategy='epoch' needs the epoch length: give "
                                               "--steps-per-epoch")
            saved = sorted(set(multiples(spe, run_total)) | {run_total})
        else:
            every = _resolve_share(save_steps, run_total) if save_steps < 1 else int(save_steps)
            saved = sorted(set(multiples(every, run_total)) | {run_total})
        return TrainerSchedule(tuple(saved), keep_newest(saved, limit if limit and limit > 0 else None))

    draft = Draft(SOURCE, origin, trainer)
    if strategy == "no":
        draft.notes.append("save_strategy = 'no': the Trainer saves nothing; this policy saves the final step only")
    elif strategy == "steps":
        if save_steps < 1 and total is not None:
            every = _resolve_share(save_steps, total)
            interval_rule(draft, every, total,
                          f"save_steps = {save_steps!r} of max_steps {total:,}, resolved as the Trainer does "
                          f"(ceil({total:,} x {save_steps!r}) = {every:,})")
        else:
            interval_rule(draft, int(save_steps), total, f"save_strategy = 'steps', save_steps = {int(save_steps)}")
        draft.notes.append("the Trainer also saves the last step with save_strategy = 'steps'; so does final")
    elif strategy == "epoch":
        epoch_rule(draft, 1, total, steps_per_epoch, "save_strategy = 'epoch'")
    else:  # best
        draft.rule({"kind": "improved", "metric": best_name, "mode": best_mode},
                   f"save_strategy = 'best': a save when {best_name} improves "
                   f"(metric_for_best_model = {metric!r}, greater_is_better = {str(greater).lower()})")
    if limit is not None and limit > 0:
        keep_last_note(draft, limit, f"save_total_limit = {limit}")
    if best_at_end and best_name is not None and best_mode is not None and limit is not None and limit > 0:
        draft.retention["keep_best"] = {"metric": best_name, "mode": best_mode, "n": 1}
        draft.retention_notes.append(
            f"load_best_model_at_end = true: the best checkpoint by {best_name} is kept as well (the Trainer "
            "counts it within save_total_limit, so the policy may keep one more)")
    elif best_at_end:
        draft.notes.append("load_best_model_at_end = true: without save_total_limit nothing is deleted, so the "
                           "best checkpoint is kept anyway")
    how = ("--total-steps" if total_steps is not None else
           "max_steps" if isinstance(max_steps, int) and max_steps > 0 else
           f"num_train_epochs {epochs!r} x {steps_per_epoch or 0:,} steps per epoch")
    run_shape(draft, total, steps_per_epoch, how)
    return draft

"""torchtitan's ``[checkpoint]`` table -> policy, and a model of its own schedule.

The semantics, per torchtitan's ``CheckpointManager`` and its config documentation
(docs/checkpoint.md and ``torchtitan/config``): with ``enable_checkpoint`` on, a save at
step 1 when ``enable_first_step_checkpoint``, at the last step of training (``[training]
steps``) always, and at every step where ``step % interval == 0``; after each save the
newest ``keep_latest_k`` are kept (0 keeps all; 1 is refused by torchtitan).
``last_save_model_only`` makes the last save hold the model weights only.
"""
from __future__ import annotations

import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .draft import Draft, Refused, TrainerSchedule, interval_rule, keep_newest, multiples, run_shape

SOURCE = "torchtitan [checkpoint]"
#: Keys about loading or where files go: they do not change when saves happen.
_LOADING = ("folder", "load_step", "initial_load_path", "initial_load_model_only", "initial_load_in_hf",
            "exclude_from_loading", "async_mode", "initial_load_model_weights_only")


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise Refused(SOURCE, [(path, f"is not valid TOML ({exc})")]) from None


def convert(config: dict[str, Any], origin: str, total_steps: int | None = None,
            steps_per_epoch: int | None = None) -> Draft:
    table = config.get("checkpoint")
    if not isinstance(table, dict):
        raise Refused(SOURCE, [("[checkpoint]", f"{origin} has no [checkpoint] table")])
    problems: list[tuple[str, str]] = []

    def whole(name: str, default: int, low: int) -> int:
        value = table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            problems.append((f"checkpoint.{name}", f"{value!r} must be a whole number >= {low}"))
            return default
        return value

    if table.get("enable_checkpoint", False) is not True and table.get("enable", False) is not True:
        problems.append(("checkpoint.enable_checkpoint", "is off: torchtitan saves nothing, so there is nothing "
                                                         "to convert; set it to true"))
    interval = whole("interval", 500, 1)
    keep = whole("keep_latest_k", 10, 0)
    if keep == 1:
        problems.append(("checkpoint.keep_latest_k", "1 is refused by torchtitan itself (the newest save may "
                                                     "still be in flight): use 0 (keep all) or 2 or more"))
    first = table.get("enable_first_step_checkpoint", False)
    model_only = table.get("last_save_model_only", True)
    for name, value in (("enable_first_step_checkpoint", first), ("last_save_model_only", model_only)):
        if not isinstance(value, bool):
            problems.append((f"checkpoint.{name}", f"{value!r} must be true or false"))
    if table.get("interval_type", "steps") != "steps":
        problems.append(("checkpoint.interval_type", f"{table['interval_type']!r}: only 'steps' maps to a policy"))
    if table.get("load_only") is True:
        problems.append(("checkpoint.load_only", "true saves nothing: there is nothing to convert"))
    if table.get("create_seed_checkpoint") is True:
        problems.append(("checkpoint.create_seed_checkpoint", "true writes a step-0 seed checkpoint and exits, "
                                                              "which is no save schedule"))
    if table.get("last_save_in_hf") is True:
        problems.append(("checkpoint.last_save_in_hf", "true writes the last save in Hugging Face's format, "
                                                       "which a policy cannot choose; set it to false"))
    dtype = table.get("export_dtype", "float32")
    if dtype != "float32":
        problems.append(("checkpoint.export_dtype", f"{dtype!r}: the store saves tensors in their own dtype; "
                                                    "use 'float32'"))
    known = {"enable_checkpoint", "enable", "interval", "keep_latest_k", "enable_first_step_checkpoint",
             "last_save_model_only", "interval_type", "load_only", "create_seed_checkpoint", "last_save_in_hf",
             "export_dtype", *_LOADING}
    for name in sorted(set(table) - known):
        problems.append((f"checkpoint.{name}", "is not a [checkpoint] key this converter knows"))
    training = config.get("training")
    run_total = total_steps
    if run_total is None and isinstance(training, dict) and "steps" in training:
        steps = training["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            problems.append(("training.steps", f"{steps!r} must be a whole number >= 1"))
        else:
            run_total = steps
    if problems:
        raise Refused(SOURCE, problems)

    def trainer(n: int, spe: int | None) -> TrainerSchedule:
        saved = sorted(set(multiples(interval, n)) | {n} | ({1} if first else set()))
        return TrainerSchedule(tuple(saved), keep_newest(saved, keep or None))

    draft = Draft(SOURCE, origin, trainer)
    interval_rule(draft, interval, run_total, f"checkpoint.interval = {interval}")
    draft.notes.append("torchtitan always saves the last training step; so does final")
    if first:
        draft.rule({"kind": "at_steps", "steps": [1]}, "checkpoint.enable_first_step_checkpoint = true")
    if keep:
        draft.retention["keep_last"] = keep
        draft.retention_notes.append(f"checkpoint.keep_latest_k = {keep}: the newest {keep} are kept")
    else:
        draft.notes.append("checkpoint.keep_latest_k = 0 keeps every checkpoint: no [retention] table")
    if model_only:
        draft.notes.append("checkpoint.last_save_model_only = true: torchtitan's last save holds the model only; "
                           "the policy's final save holds the whole state (a superset)")
    loading = sorted(set(table) & set(_LOADING))
    if loading:
        draft.notes.append(f"{', '.join('checkpoint.' + k for k in loading)}: loading and placement, not when "
                           "saves happen; not part of a policy")
    run_shape(draft, run_total, steps_per_epoch, "--total-steps" if total_steps else "[training] steps")
    return draft

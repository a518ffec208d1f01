"""A converted policy before it is written: rules, retention and run shape with comments.

:class:`Draft` holds what an importer mapped, each part with the comment that
names the trainer setting it came from; :meth:`Draft.toml` writes the policy
file.  :class:`TrainerSchedule` is what the trainer itself would save and
keep over a run, from the importer's model of its semantics.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

#: A table or rule as TOML key/value pairs (ints, strs, bools, lists and dicts of those).
Table = dict[str, object]


class Refused(Exception):
    """Settings that a policy cannot express: (setting, why) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: cannot convert {len(problems)} setting{'' if len(problems) == 1 else 's'}:"]
        lines += [f"  {name}: {why}" for name, why in problems]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class TrainerSchedule:
    """What the trainer saves over a run and keeps at its end; ``why_not`` when it cannot be modelled."""

    saved: tuple[int, ...] = ()
    kept: tuple[int, ...] = ()
    why_not: str | None = None


#: The model of a trainer's own schedule: (total_steps, steps_per_epoch) -> what it saves and keeps.
TrainerModel = Callable[[int, "int | None"], TrainerSchedule]


@dataclass
class Draft:
    """A policy being built from a trainer's settings."""

    source: str  # the trainer's name in messages: "TrainingArguments", "ModelCheckpoint", ...
    origin: str  # where the settings came from (a file name, or the argument)
    trainer: TrainerModel
    notes: list[str] = field(default_factory=list)
    rules: list[tuple[Table, list[str]]] = field(default_factory=list)
    retention: Table = field(default_factory=dict)
    retention_notes: list[str] = field(default_factory=list)
    run: Table = field(default_factory=dict)
    run_notes: list[str] = field(default_factory=list)

    def rule(self, table: Table, *comments: str) -> None:
        self.rules.append((table, list(comments)))

    def toml(self) -> str:
        out = [f"# Converted by `python -m saverules.convert` from {self.source} ({self.origin}).",
               "# Every rule and key below names the setting it came from."]
        out += [f"# {line}" for line in self.notes]
        out += ["version = 1", "# final = true (the default): the last step is always saved, whatever the trainer does",
                "final = true"]
        for table, comments in self.rules:
            out.append("")
            out += [f"# {c}" for c in comments]
            out.append("[[rules]]")
            out += [f"{k} = {_value(v)}" for k, v in table.items()]
        if self.retention:
            out.append("")
            out += [f"# {c}" for c in self.retention_notes]
            out.append("[retention]")
            out += [f"{k} = {_value(v)}" for k, v in self.retention.items()]
        if self.run:
            out.append("")
            out += [f"# {c}" for c in self.run_notes]
            out.append("[run]")
            out += [f"{k} = {_value(v)}" for k, v in self.run.items()]
        return "\n".join(out) + "\n"


def _value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as a policy value")


def keep_newest(saved: list[int], n: int | None) -> tuple[int, ...]:
    """The newest ``n`` of ``saved`` (all of them when ``n`` is None)."""
    return tuple(saved if n is None else saved[-n:])


def multiples(every: int, total: int) -> list[int]:
    return list(range(every, total + 1, every))


def keep_last_note(draft: Draft, n: int, setting: str) -> None:
    """Retention keeping the newest ``n``; a single copy becomes 2, as `check --strict` asks."""
    if n == 1:
        draft.retention["keep_last"] = 2
        draft.retention_notes.append(
            f"{setting} keeps 1 checkpoint; the policy keeps 2, since a single copy that turns out damaged "
            "leaves nothing to fall back to (`check --strict` refuses keep_last = 1)")
    else:
        draft.retention["keep_last"] = n
        draft.retention_notes.append(f"{setting}: the newest {n} are kept")


def interval_rule(draft: Draft, every: int, total: int | None, setting: str) -> bool:
    """An every_steps rule, or a note when the interval is longer than a known run (it never fires there)."""
    if total is not None and every > total:
        draft.notes.append(f"{setting} ({every:,}) is longer than the run ({total:,} steps): it never fires, so "
                           "no rule stands for it; the final step is still saved")
        return False
    draft.rule({"kind": "every_steps", "every": every}, f"{setting}: a save at every multiple of {every:,} steps")
    return True


def epoch_rule(draft: Draft, every: int, total: int | None, steps_per_epoch: int | None, setting: str) -> None:
    """An epoch_end rule, or a note when no k-th epoch ends within a known run."""
    if total is not None and steps_per_epoch is not None and every * steps_per_epoch > total:
        draft.notes.append(f"{setting}: no {'' if every == 1 else f'{every}th '}epoch end falls within the run "
                           f"({total:,} steps of {steps_per_epoch:,} per epoch), so no rule stands for it; the "
                           "final step is still saved")
        return
    draft.rule({"kind": "epoch_end", "every": every}, f"{setting}: a save at every "
               f"{'' if every == 1 else f'{every}th '}epoch end")


def run_shape(draft: Draft, total: int | None, steps_per_epoch: int | None, how: str) -> None:
    """The [run] table: the run's length (from ``how``) and the epoch length when an epoch ends in the run."""
    if total is not None:
        draft.run["total_steps"] = total
        draft.run_notes.append(f"the run's length, from {how}")
    if steps_per_epoch is not None:
        if total is not None and steps_per_epoch > total:
            draft.notes.append(f"steps per epoch ({steps_per_epoch:,}) is longer than the run ({total:,} steps): "
                               "no epoch ends in it, so [run] leaves it out")
        else:
            draft.run["steps_per_epoch"] = steps_per_epoch

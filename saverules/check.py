"""Validate save policies and simulate them before a run starts.

    python -m saverules.check rules/default.toml
    python -m saverules.check rules/*.toml --total-steps 39998 --steps-per-epoch 19999 --strict
    python -m saverules.check rules/default.toml --format json
    python -m saverules.check rules/minimind-legacy.toml rules/default.toml --plot schedules.png

For each file: errors as ``FILE:LINE:COL: error: message``; otherwise the
simulated schedule (every save with its step, time and reasons, the
checkpoints kept at the end, the largest gap, a timeline) and warnings as
``FILE:LINE:COL: warning: message``.  ``--plot IMAGE`` also draws the schedules, one
row per file (:mod:`saverules.plot`, which needs matplotlib: ``saverules[plot]``).

Exit status: 0 when every file is valid (and, with ``--strict``, warning
free), 1 on any error or, with ``--strict``, any warning, 2 on bad usage (a
``--plot`` file that is not .png or .svg, or ``--plot`` without matplotlib, included).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field

from .engine import rules as R
from .engine.compile import CLOCK, EPOCH_END, METRICS, SIGNAL, rule_events
from .engine.cost import CostReport, cost_report, report_lines, report_warnings
from .engine.errors import Diagnostic, PolicyError
from .engine.limits import MAX_STEPS, steps_text
from .engine.loader import load
from .engine.policy import Policy
from .engine.quantities import Duration, Share, Size, _validate_duration, _validate_size, format_seconds, resolve_steps
from .engine.simulate import Simulation
from .engine.tiers import TierSimulation, simulate_tiers

#: With more saves than this, the text report shows the first and last few.
ELIDE_ABOVE = 24
SHOWN_AT_EACH_END = 8
TIMELINE_WIDTH = 64


@dataclass
class Finding:
    """A warning or a note about one place in a policy file."""

    line: int
    col: int
    message: str


@dataclass
class Report:
    """Everything `check` says about one file."""

    file: str
    errors: list[Diagnostic] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    notes: list[Finding] = field(default_factory=list)
    policy: Policy | None = None
    total_steps: int | None = None
    steps_per_epoch: int | None = None
    step_seconds: float | None = None
    shape_from: str = ""
    simulation: Simulation | None = None
    costs: dict = field(default_factory=dict)  # save_seconds, write_seconds, mtbf, restart_seconds, checkpoint_size
    cost: CostReport | None = None
    tiers: TierSimulation | None = None


# -- analysis -----------------------------------------------------------------


def _where(policy: Policy, *path) -> tuple[int, int]:
    """Line and column of ``path`` in the file, or of its nearest enclosing key."""
    while path:
        pos = policy.position(path)
        if pos is not None:
            return pos
        path = path[:-1]
    return (1, 1)


def _is_event_driven(rule: R.RuleModel, with_metrics: bool, with_epochs: bool = True) -> bool:
    """Rules that react to outside events (signals, metrics, epoch ends without an epoch
    length) the simulation does not invent, as their nodes declare (``Node.events``)."""
    unsimulated = {SIGNAL} | ({METRICS} if not with_metrics else set()) | ({EPOCH_END} if not with_epochs else set())
    return bool(rule_events(rule) & unsimulated)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


def _uses_share(rule: R.RuleModel) -> tuple | None:
    """The first key (as a path inside the rule) whose value is a share of the run."""

    def visit(model, path):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, Share):
                return path + (name,)
            items = value if isinstance(value, tuple) else (value,)
            for i, item in enumerate(items):
                if isinstance(item, R.Model):
                    sub = path + ((name, i) if isinstance(value, tuple) else (name,))
                    found = visit(item, sub)
                    if found:
                        return found
        return None

    return visit(rule, ())


def _shape(args, policy: Policy) -> tuple[int | None, int | None, float | None, str]:
    run = policy.run
    total = args.total_steps if args.total_steps is not None else (run.total_steps if run else None)
    spe = args.steps_per_epoch if args.steps_per_epoch is not None else (run.steps_per_epoch if run else None)
    secs = args.step_seconds if args.step_seconds is not None else (run.step_seconds if run else None)
    given = [args.total_steps, args.steps_per_epoch, args.step_seconds]
    if all(v is None for v in given):
        origin = "[run]" if run else ""
    elif all(v is not None for v in given) or run is None:
        origin = "flags"
    else:
        origin = "flags and [run]"
    return total, spe, secs, origin


_COSTS = ("save_seconds", "write_seconds", "mtbf", "restart_seconds", "checkpoint_size")


def _costs(args, policy: Policy) -> dict:
    """What a save costs and how often the job fails: the flags, else [run]; plain numbers
    (seconds, bytes).  Absent values are None."""
    run = policy.run
    out = {}
    for name in _COSTS:
        value = getattr(args, name, None)
        if value is None and run is not None:
            value = getattr(run, name)
        if isinstance(value, Duration):
            value = value.seconds
        elif isinstance(value, Size):
            value = value.bytes
        out[name] = value
    return out


def _uses_cost(policy: Policy) -> bool:
    return any(R.uses_cost(rule) for rule in policy.rules)


def analyse(path: str, args) -> Report:
    report = Report(path)
    try:
        policy = load(path)
    except PolicyError as exc:
        report.errors = exc.diagnostics
        return report
    report.policy = policy
    total, spe, secs, origin = _shape(args, policy)
    report.total_steps, report.steps_per_epoch, report.step_seconds, report.shape_from = total, spe, secs, origin

    final_off = "final = false turns off the guarantee that the last step is saved"
    if total is None:
        if not policy.final:
            report.warnings.append(Finding(*_where(policy, "final"), final_off))
        for i, rule in enumerate(policy.rules):
            share = _uses_share(rule)
            if share:
                report.warnings.append(Finding(
                    *_where(policy, "rules", i, *share),
                    f"rules[{i}] uses a share of the run, but no total_steps is known: add [run] total_steps or "
                    "pass --total-steps here, and give the loop's total to the decider "
                    "(Progress.total_steps or Policy.compile(total_steps)); without it the first decision fails"))
        report.notes.append(Finding(1, 1, "not simulated: no run length; add [run] total_steps or pass --total-steps"))
        return report
    if spe is not None and spe > total:
        report.warnings.append(Finding(*_where(policy, "run", "steps_per_epoch"),
                                       f"steps_per_epoch {spe:,} is longer than the run ({_plural(total, 'step')}): "
                                       "no epoch ends in it"))
    costs = report.costs = _costs(args, policy)
    stall, write = costs["save_seconds"], costs["write_seconds"]
    if write is not None and stall is not None and write < stall:
        report.errors = [Diagnostic(path, *_where(policy, "run", "write_seconds"),
                                    f"write_seconds ({write:g}) must be at least save_seconds ({stall:g}): "
                                    "the whole write includes the stall")]
        return report
    if write is not None and stall is None:
        report.notes.append(Finding(*_where(policy, "run", "write_seconds"),
                                    "write_seconds is used only with save_seconds: give --save-seconds or "
                                    "[run] save_seconds"))
        write = None
    try:
        sim = policy.simulate(total, spe, secs, save_seconds=stall, write_seconds=write)
    except PolicyError as exc:  # a share that resolves to something impossible for this total
        report.errors = [d._replace(source=path) for d in exc.diagnostics]
        return report
    report.simulation = sim
    if policy.durable is not None:
        report.tiers = simulate_tiers(policy, total, spe, secs)
        _tier_findings(report, policy)
    _rule_findings(report, policy, sim, total, spe, secs)
    _retention_findings(report, policy, sim)
    _cost_findings(report, policy, sim)
    if not policy.final and sim.unsaved_tail is None:
        report.warnings.append(Finding(*_where(policy, "final"), final_off))
    elif not policy.final:
        lost = sim.unsaved_tail
        last = total - lost
        if lost == 0:
            report.warnings.append(Finding(*_where(policy, "final"), final_off + " (this run saves it anyway)"))
        else:
            report.warnings.append(Finding(
                *_where(policy, "final"),
                f"{final_off}: in this run steps {last + 1:,}-{total:,} ({_plural(lost, 'step')}"
                + (f", {format_seconds(lost * secs)} of training" if secs else "")
                + ") are in no checkpoint; remove `final = false` to save the last step"))
    return report


def _tier_findings(report: Report, policy: Policy) -> None:
    tiers = report.tiers
    if tiers is None:
        return
    if tiers.lag_steps is not None and tiers.upload_seconds is not None:
        a, b = tiers.lag_steps
        gap = tiers.gap_seconds(b - a) or 0.0
        report.warnings.append(Finding(
            *_where(policy, "durable", "rules"),
            f"durable saves at steps {a:,} and {b:,} come {format_seconds(gap)} apart, but an upload takes "
            f"{format_seconds(tiers.upload_seconds)}: promotions queue, and the newer replaces the queued one; "
            "save to the durable tier less often, or upload faster"))
    elif tiers.upload_seconds is None and policy.durable is not None and policy.durable.rules:
        report.notes.append(Finding(1, 1, "the upload lag is not simulated: add [run] upload_seconds, or "
                                          "checkpoint_size and upload_bandwidth"))


def _tier_lines(tiers: TierSimulation) -> list[str]:
    def gap(steps: int) -> str:
        secs = tiers.gap_seconds(steps)
        return _plural(steps, "step") + (f" ({format_seconds(secs)} of training)" if secs is not None else "")

    node = tiers.node_loss_seconds
    lost = gap(tiers.durable_gap_steps)
    if node is not None and tiers.upload_seconds:
        lost += f", {format_seconds(node)} with the upload"
    dsaves = tiers.durable.saves
    return [
        f"local    {len(tiers.local_saves)} saves ({len(dsaves)} of them promoted), kept "
        f"{', '.join(_fmt_steps(s) for s in tiers.local_kept) or 'none'}",
        f"durable  {len(dsaves)} saves: {', '.join(_fmt_steps(s) for s, _ in dsaves[:SHOWN_AT_EACH_END])}"
        + (", ..." if len(dsaves) > SHOWN_AT_EACH_END else "")
        + f"; kept {', '.join(_fmt_steps(s) for s in tiers.durable.kept) or 'none'}",
        f"tiers    a crashed process loses at most {gap(tiers.local_gap_steps)}; a lost node loses at most {lost}",
    ]


def _rule_findings(report, policy, sim, total, spe, secs) -> None:
    epochs = total // spe if spe else 0  # the epochs that end in this run
    fired = sim.fired_total  # None when the saves beyond the listing are not known
    for i, rule in enumerate(policy.rules):
        where = _where(policy, "rules", i)
        name = R.describe(rule)
        if _is_event_driven(rule, with_metrics=False, with_epochs=spe is not None):
            hint = ("" if _is_event_driven(rule, with_metrics=False) else
                    ": epoch ends are simulated only with --steps-per-epoch or [run] steps_per_epoch")
            report.notes.append(Finding(*where, f"rules[{i}] {name} fires on events, not simulated{hint}"))
            continue
        if R.uses_cost(rule) and report.costs.get("save_seconds") is None:
            report.notes.append(Finding(*where, f"rules[{i}] {name} depends on the measured save cost, not "
                                                "simulated: give --save-seconds or [run] save_seconds"))
            continue
        if CLOCK in rule_events(rule) and secs is None:
            report.notes.append(Finding(*where, f"rules[{i}] {name} reads the training clock, not simulated: "
                                                "give --step-seconds or [run] step_seconds"))
            continue
        longer = _longer_than_run(rule, total, epochs, secs)
        if longer:
            report.warnings.append(Finding(*_where(policy, "rules", i, longer[0]), f"rules[{i}] {longer[1]}"))
        elif fired is not None and name not in {R.static_reason(reason) for reason in fired}:
            # (a reason names an adaptive rule's interval; the rule is named without it)
            report.warnings.append(Finding(*where, f"rules[{i}] {name} never fires in this run of "
                                                   f"{_plural(total, 'step')}"))


def _longer_than_run(rule, total, epochs, secs) -> tuple[str, str] | None:
    if isinstance(rule, R.EveryStepsRule):
        every = resolve_steps(rule.every, total)
        if every > total:
            return "every", (f"interval {every:,} steps is longer than the run ({_plural(total, 'step')}): "
                             "it never fires")
    if isinstance(rule, R.EveryTimeRule) and secs is not None:
        if rule.every.seconds > total * secs:
            return "every", (f"interval {rule.every} is longer than the run "
                             f"({format_seconds(total * secs)} of training): it never fires")
    if isinstance(rule, R.EpochEndRule) and rule.every > epochs:
        cadence = "every epoch" if rule.every == 1 else f"every {rule.every} epochs"
        return "every", (f"{cadence}, but {_plural(epochs, 'epoch')} end{'s' if epochs == 1 else ''} in this run "
                         "(an epoch ends at a multiple of steps_per_epoch): it never fires")
    return None


def _retention_findings(report, policy, sim) -> None:
    retention = policy.retention
    if retention is None:
        return
    total = report.total_steps
    if retention.keep_every is not None and retention.keep_every > total:
        report.warnings.append(Finding(*_where(policy, "retention", "keep_every"),
                                       f"keep_every {retention.keep_every:,} is longer than the run "
                                       f"({_plural(total, 'step')}): it keeps nothing"))
    if sim.complete and len(sim.saves) > 1 and len(sim.kept) == 1 and sim.kept[0] == sim.saves[-1][0]:
        report.warnings.append(Finding(
            *_where(policy, "retention"),
            "retention leaves only the final checkpoint: if it is damaged there is nothing to fall back to; "
            "raise keep_last to 2 or more"))


def _cost_findings(report, policy, sim) -> None:
    """The cost and disk report, and its warnings, at the [run] key each one concerns."""
    costs = report.costs
    if all(costs[name] is None for name in _COSTS):
        return
    if not sim.complete:
        # the rework, the waste and the disk use need every gap and every save of the run
        count = "an unknown number of" if sim.save_count is None else f"{sim.save_count:,}"
        report.notes.append(Finding(*_where(policy, "run"), (
            f"no cost and disk report: it needs every save of the run, and this run has {count} saves, more than "
            f"the {len(sim.saves):,} a simulation lists (to step {sim.listed_to:,}); check a shorter run "
            "(--total-steps) or a policy that saves less often")))
        return
    report.cost = cost = cost_report(
        sim.saved_steps, sim.total_steps, sim.step_seconds, peak_kept=sim.peak_kept,
        peak_on_disk=sim.peak_on_disk, save_seconds=costs["save_seconds"], mtbf=costs["mtbf"], restart_seconds=costs["restart_seconds"],
        checkpoint_bytes=costs["checkpoint_size"],
    )
    if sim.step_seconds is None and (costs["save_seconds"] is not None or costs["mtbf"] is not None):
        report.notes.append(Finding(*_where(policy, "run"), "the cost report needs the step time for shares of "
                                                            "the run and rework: give --step-seconds or [run] step_seconds"))
    elif costs["mtbf"] is not None and costs["save_seconds"] is None:
        report.notes.append(Finding(*_where(policy, "run", "mtbf"), "the expected waste needs the save cost: give "
                                                                   "--save-seconds or [run] save_seconds"))
    for message in report_warnings(cost):
        key = "save_seconds" if message.startswith("saving") else "mtbf"
        report.warnings.append(Finding(*_where(policy, "run", key), message))


# -- output -------------------------------------------------------------------


def _fmt_steps(n: int) -> str:
    return f"{n:,}"


def _timeline(sim: Simulation, width: int = TIMELINE_WIDTH) -> str:
    """One character per 1/width of the run: '.' no save, '|' one, '#' several; when the
    saves are not all listed, '~' where they are counted or unknown, not listed."""
    total = sim.total_steps
    width = min(width, total)
    counts = [0] * width
    column = lambda step: min(width - 1, (step - 1) * width // total)  # noqa: E731
    for step, _ in list(sim.saves) + list(sim.last_saves):
        counts[column(step)] += 1
    chars = ["." if c == 0 else "|" if c == 1 else "#" for c in counts]
    if not sim.complete:
        end = sim.last_saves[0][0] if sim.last_saves else total + 1
        for i in range(column(sim.listed_to + 1), column(end - 1) + 1 if end - 1 > sim.listed_to else 0):
            chars[i] = "~" if counts[i] == 0 else chars[i]
    return "".join(chars)


def gap_text(sim: Simulation) -> str:
    """The largest gap in words, as the report and the plot (saverules.plot) both say it."""
    gap = _plural(sim.max_gap_steps, "step")
    if sim.max_gap_seconds is not None:
        gap += f" ({format_seconds(sim.max_gap_seconds)} of training)"
    return gap + ("" if sim.complete else f" in steps 1-{sim.listed_to:,} (not known beyond)")


def _run_line(r: Report) -> str:
    total = r.total_steps
    if total is None:
        raise ValueError(f"{r.file}: the run line needs a run length; only a simulated report has one")
    parts = [_plural(total, "step")]
    spe = r.steps_per_epoch
    if spe:
        ended, rest = divmod(total, spe)
        if not ended:
            parts.append(f"less than one epoch of {_fmt_steps(spe)} (no epoch ends)")
        elif rest:
            parts.append(f"{_plural(ended, 'epoch')} of {_fmt_steps(spe)} and {_plural(rest, 'step')} "
                         "of one that does not end")
        else:
            parts.append(f"{_plural(ended, 'epoch')} of {_fmt_steps(spe)}")
    if r.step_seconds:
        parts.append(f"{r.step_seconds:g} s/step ({format_seconds(total * r.step_seconds)})")
    return ", ".join(parts) + (f"   (from {r.shape_from})" if r.shape_from else "")


def _summarise_reasons(saves) -> str:
    counts: dict[str, int] = {}
    for _, reasons in saves:
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(f"{reason} x{n}" for reason, n in counts.items())


def render_text(r: Report, show_all: bool, out) -> None:
    for d in r.errors:
        print(str(d), file=out)
    if r.errors:
        return
    policy, sim = r.policy, r.simulation
    if policy is None:
        raise ValueError(f"{r.file}: a report without errors must hold its policy")
    rules = len(policy.rules)
    guarantee = "the final step is always saved" if policy.final else "final step NOT guaranteed"
    print(f"{r.file}: valid, {rules} rule{'s' if rules != 1 else ''}, {guarantee}", file=out)
    if sim is not None:
        print(f"  run      {_run_line(r)}", file=out)
        if sim.complete:
            print(f"  saves    {len(sim.saves)}", file=out)
        elif sim.save_count is not None:
            print(f"  saves    {sim.save_count:,}: counted; the first {len(sim.saves):,} are listed (to step "
                  f"{sim.listed_to:,})" + (f" and the last {len(sim.last_saves):,}" if sim.last_saves else ""),
                  file=out)
        else:
            print(f"  saves    more than {len(sim.saves):,}: the first {len(sim.saves):,} are listed (to step "
                  f"{sim.listed_to:,}); the rest cannot be counted for this policy without simulating each",
                  file=out)
        timed = r.step_seconds is not None
        rows = [(s, reasons) for s, reasons in sim.saves]
        width = max([len(_fmt_steps(s)) for s, _ in rows] + [4])
        header = f"    {'step':>{width}}  " + (f"{'time':>9}  " if timed else "") + "reasons"
        print(header, file=out)

        def row(step, reasons):
            time = f"{format_seconds(sim.time_of(step)):>9}  " if timed else ""
            return f"    {_fmt_steps(step):>{width}}  {time}{', '.join(reasons)}"

        if not sim.complete:
            shown = rows if show_all else rows[:SHOWN_AT_EACH_END]
            for s, reasons in shown:
                print(row(s, reasons), file=out)
            unlisted = (sim.save_count - len(shown) - len(sim.last_saves)) if sim.save_count is not None else None
            what = (f"{unlisted:,} more saves, not listed" if unlisted is not None else "more saves, not counted")
            more = f"; --all lists the first {len(rows):,}" if not show_all and len(rows) > len(shown) else ""
            print(f"    {'...':>{width}}  {what} (a simulation lists at most {len(rows):,}){more}", file=out)
            for s, reasons in sim.last_saves[-SHOWN_AT_EACH_END:] if not show_all else sim.last_saves:
                print(row(s, reasons), file=out)
        elif len(rows) > ELIDE_ABOVE and not show_all:
            hidden = rows[SHOWN_AT_EACH_END:-SHOWN_AT_EACH_END]
            for s, reasons in rows[:SHOWN_AT_EACH_END]:
                print(row(s, reasons), file=out)
            print(f"    {'...':>{width}}  {len(hidden)} more saves ({_summarise_reasons(hidden)}); --all lists them",
                  file=out)
            for s, reasons in rows[-SHOWN_AT_EACH_END:]:
                print(row(s, reasons), file=out)
        else:
            for s, reasons in rows:
                print(row(s, reasons), file=out)
        upto = "" if sim.complete else f" (at step {sim.listed_to:,}, where the listing stops)"
        kept = sim.kept if len(sim.kept) <= ELIDE_ABOVE or show_all else sim.kept[-SHOWN_AT_EACH_END:]
        kept_text = ("..., " if len(kept) < len(sim.kept) else "") + (", ".join(_fmt_steps(s) for s in kept) or "none")
        print(f"  kept     {kept_text}   ({len(sim.kept)} at the end{upto}, at most {sim.peak_kept} at once, "
              f"{sim.peak_on_disk} on disk while the next is written)", file=out)
        print(f"  max gap  {gap_text(sim)}: the most work a crash can lose", file=out)
        if not sim.complete and sim.fired_total is not None:
            counts = sorted(sim.fired_total.items(), key=lambda item: -item[1])
            top = counts if show_all or len(counts) <= SHOWN_AT_EACH_END else counts[:SHOWN_AT_EACH_END]
            rest = f", and {len(counts) - len(top):,} more reasons (--all lists them)" if len(top) < len(counts) else ""
            print(f"  fired    {', '.join(f'{reason} x{n:,}' for reason, n in top)}{rest}", file=out)
        print(f"  timeline 0 [{_timeline(sim)}] {_fmt_steps(sim.total_steps)}", file=out)
        if r.cost is not None:
            for line in report_lines(r.cost):
                print(f"  {line}", file=out)
        if r.tiers is not None:
            for line in _tier_lines(r.tiers):
                print(f"  {line}", file=out)
    for n in r.notes:
        print(f"  note: {n.message}", file=out)
    for w in r.warnings:
        print(f"{r.file}:{w.line}:{w.col}: warning: {w.message}", file=out)


def to_json(r: Report) -> dict:
    doc = {
        "file": r.file,
        "valid": not r.errors,
        "errors": [{"line": d.line, "col": d.col, "message": d.message} for d in r.errors],
        "warnings": [{"line": w.line, "col": w.col, "message": w.message} for w in r.warnings],
        "notes": [{"line": n.line, "col": n.col, "message": n.message} for n in r.notes],
    }
    if r.policy is not None:
        doc["final"] = r.policy.final
        doc["digest"] = r.policy.digest
        doc["run"] = {"total_steps": r.total_steps, "steps_per_epoch": r.steps_per_epoch,
                      "step_seconds": r.step_seconds, "from": r.shape_from or None,
                      **{k: v for k, v in r.costs.items() if v is not None}}
    sim = r.simulation
    if sim is not None:
        doc.update(
            saves=[{"step": s, "time": sim.time_of(s), "reasons": list(reasons)} for s, reasons in sim.saves],
            kept=sim.kept,
            peak_kept=sim.peak_kept,
            peak_on_disk=sim.peak_on_disk,
            max_gap_steps=sim.max_gap_steps,
            max_gap_seconds=sim.max_gap_seconds,
            fired=sim.fired,
            timeline=_timeline(sim),
            complete=sim.complete,
            listed_to=sim.listed_to,
            save_count=sim.save_count,
            fired_total=sim.fired_total,
            last_saves=[{"step": s, "time": sim.time_of(s), "reasons": list(reasons)} for s, reasons in sim.last_saves],
        )
        if r.cost is not None:
            doc["cost"] = r.cost.as_dict()
    tiers = r.tiers
    if tiers is not None:
        doc["tiers"] = {
            "local": {"saves": [s for s, _ in tiers.local_saves], "kept": tiers.local_kept,
                      "max_gap_steps": tiers.local_gap_steps},
            "durable": {"saves": [{"step": s, "reasons": list(rs)} for s, rs in tiers.durable.saves],
                        "kept": tiers.durable.kept, "max_gap_steps": tiers.durable_gap_steps},
            "upload_seconds": tiers.upload_seconds,
            "upload_lag": list(tiers.lag_steps) if tiers.lag_steps is not None else None,
            "node_loss_seconds": tiers.node_loss_seconds,
        }
    return doc


# -- command line -------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # exit 2 with a hint, as argparse does, but say what to do
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    digits = text.strip().replace("_", "")
    if len(digits) > 30:  # int() of a huge string is slow; no step count is this long
        raise argparse.ArgumentTypeError(f"must be at most {steps_text(MAX_STEPS)}, got a {len(digits)}-digit number")
    try:
        value = int(digits)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be at most {steps_text(MAX_STEPS)}, got {value:,}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (0 < value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (0 <= value < math.inf):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def _duration(text: str):
    try:
        return _validate_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str):
    try:
        return _validate_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m saverules.check",
                description="Validate saverules policies and simulate their save schedule.")
    p.add_argument("files", nargs="+", metavar="FILE", help="policy files (TOML)")
    p.add_argument("--total-steps", type=_positive_int, metavar="N", help="run length to simulate (overrides [run])")
    p.add_argument("--steps-per-epoch", type=_positive_int, metavar="N", help="epoch length (overrides [run])")
    p.add_argument("--step-seconds", type=_positive_float, metavar="S",
                   help="seconds per optimizer step, for time rules (overrides [run])")
    p.add_argument("--save-seconds", type=_positive_float, metavar="S",
                   help="training time one save stalls, for the cost report and adaptive rules (overrides [run])")
    p.add_argument("--write-seconds", type=_positive_float, metavar="S",
                   help="wall time of one whole write, when asynchronous (default: the stall; overrides [run])")
    p.add_argument("--mtbf", type=_duration, metavar="DURATION",
                   help='mean time between failures of the job, e.g. "6h" (overrides [run])')
    p.add_argument("--restart-seconds", type=_non_negative_float, metavar="S",
                   help="seconds a restart after a failure costs (overrides [run])")
    p.add_argument("--checkpoint-size", type=_size, metavar="SIZE",
                   help='size of one checkpoint, e.g. "2GB" or "512MiB" (overrides [run])')
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default text)")
    p.add_argument("--strict", action="store_true", help="treat warnings as errors (exit 1)")
    p.add_argument("--all", action="store_true", help="list every save instead of eliding the middle")
    p.add_argument("--plot", metavar="IMAGE",
                   help="also draw the schedules, one row per file, into IMAGE (.png or .svg; needs matplotlib: "
                        "pip install 'saverules[plot]')")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    draw: types.ModuleType | None = None
    if args.plot is not None:
        from . import plot  # only --plot imports matplotlib

        draw = plot
        try:
            plot.check_target(args.plot)
            plot.require()
        except plot.PlotError as exc:
            p.print_usage(sys.stderr)
            print(f"{p.prog}: error: {exc}", file=sys.stderr)
            return 2
    reports = []
    for path in args.files:
        if draw is not None:  # a long simulation is not silent
            print(f"plot: simulating {path}", file=sys.stderr, flush=True)
        reports.append(analyse(path, args))
    failed = any(r.errors or (args.strict and r.warnings) for r in reports)
    if args.format == "json":
        json.dump({"files": [to_json(r) for r in reports], "strict": args.strict, "ok": not failed},
                  sys.stdout, indent=2)
        print()
    else:
        for i, r in enumerate(reports):
            if i:
                print()
            render_text(r, args.all, sys.stdout)
        if args.strict and any(r.warnings for r in reports) and not any(r.errors for r in reports):
            print("--strict: warnings count as errors", file=sys.stderr)
    if draw is not None:
        try:
            draw.plot(reports, args.plot, log=sys.stderr)
        except OSError as exc:
            print(f"{p.prog}: error: cannot write {args.plot}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:  # e.g. piped into head
        sys.exit(0)

"""What a save costs and what it protects: the adaptive interval and the cost report.

Pure arithmetic on numbers that arrive as data (measured save costs, a run's
shape, a mean time between failures); nothing here reads a clock.

* :func:`estimate` turns the save costs reported so far into the decider's
  estimate: the mean of the last :data:`COST_WINDOW` reports.
* :func:`daly_interval` is Daly's (2006) higher-order optimum checkpoint
  interval; :func:`adaptive_interval` is the interval of the ``adaptive`` rule.
* :func:`cost_report` is the cost and disk report of ``check``: time spent
  saving, the expected rework per failure, the expected waste with and without
  the optimum interval, and the disk a schedule needs.

docs/rules.md (``adaptive``) and docs/check.md (the cost report) give the
formulas with worked numbers.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: The decider's estimate of a save's cost is the mean of this many latest reports.
COST_WINDOW = 3

#: ``check`` warns when saving takes more than this share of the run.
SAVING_SHARE_WARNING = 0.10
#: ``check`` warns when a policy wastes more than this many times the optimum's waste.
WASTE_RATIO_WARNING = 2.0

Cost = tuple[float, float]  # (stall seconds c, write seconds w)


def check_cost(stall_seconds: object, write_seconds: object = None) -> Cost:
    """Validate one measured save cost; ``write_seconds`` defaults to the stall (a synchronous save)."""
    values: list[float] = []
    for name, value in (("stall_seconds", stall_seconds), ("write_seconds", write_seconds)):
        if value is None and name == "write_seconds":
            values.append(values[0])
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:
                value = float(value)  # type: ignore[arg-type]  # numpy scalars; any other object raises TypeError
            except (TypeError, ValueError):
                raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}") from None
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        values.append(value)
    return values[0], values[1]


def estimate(reports: Sequence[Cost]) -> Cost | None:
    """The mean of the last :data:`COST_WINDOW` reports, in report order: (c1 + c2 + c3) / 3.

    None before any report.
    """
    last = list(reports)[-COST_WINDOW:]
    if not last:
        return None
    n = len(last)
    c = 0.0
    w = 0.0
    for stall, write in last:
        c += stall
        w += write
    return c / n, w / n


def daly_interval(c: float, mtbf: float) -> float:
    """Daly's higher-order optimum interval between saves of cost ``c`` for a job
    that fails every ``mtbf`` seconds on average.

    For c < 2M: sqrt(2cM) * (1 + sqrt(c / 2M) / 3 + (c / 2M) / 9) - c; otherwise M.
    """
    if c < 2 * mtbf:
        x = c / (2 * mtbf)
        return math.sqrt(2 * c * mtbf) * (1 + math.sqrt(x) / 3 + x / 9) - c
    return mtbf


def adaptive_interval(
    cost: Cost | None,
    max_overhead: float | None,
    mtbf: float | None,
    min_every: float,
    max_every: float | None,
) -> float:
    """T = min(max_every, max(min_every, c / max_overhead, T_daly(c, mtbf), w)).

    ``max_overhead`` is a fraction (0.02 for "2%"); a term whose setting is
    None is left out.  Before any cost is known (``cost`` None) T = min_every.
    """
    if cost is None:
        return min_every
    c, w = cost
    terms = [min_every, w]
    if max_overhead is not None:
        terms.append(c / max_overhead)
    if mtbf is not None:
        terms.append(daly_interval(c, mtbf))
    interval = max(terms)
    if max_every is not None:
        interval = min(max_every, interval)
    return interval


# -- the report ------------------------------------------------------------------


def gaps(save_steps: Iterable[int], total_steps: int) -> list[int]:
    """Steps between consecutive saves, from step 0 to the run's last step."""
    points = [0] + [s for s in save_steps if 0 < s <= total_steps]
    if points[-1] != total_steps:
        points.append(total_steps)
    return [b - a for a, b in zip(points, points[1:])]


def rework_per_failure(save_steps: Iterable[int], total_steps: int, step_seconds: float) -> float:
    """Training time since the last save, averaged over a failure at a uniformly
    random instant of the run: sum(gap^2 / 2) / run time.

    The gaps are whole steps, so sum(gap^2) is exact; in seconds this is
    sum(gap_steps^2) * step_seconds / (2 * total_steps).
    """
    squares = sum(g * g for g in gaps(save_steps, total_steps))
    return squares * step_seconds / (2 * total_steps)


def _periodic_waste(interval: float, run: float, c: float, mtbf: float, restart: float) -> tuple[int, float]:
    """Saves and expected waste of a run of ``run`` seconds that saves every
    ``interval`` seconds of training and at its end."""
    k = math.floor(run / interval)
    rest = run - k * interval
    if rest < 0:
        rest = 0.0
    saves = k + (1 if rest > 0 else 0)  # >= 1: a run shorter than one interval (k = 0) is all rest
    rework = (k * interval * interval + rest * rest) / (2 * run)
    return saves, saves * c + run / mtbf * (rework + restart)


@dataclass(frozen=True)
class CostReport:
    """The cost and disk report of one simulated schedule.  Seconds are training time;
    a field is None when the numbers it needs were not given."""

    saves: int
    save_seconds: float | None = None
    run_seconds: float | None = None
    saving_seconds: float | None = None
    saving_share: float | None = None
    rework_seconds: float | None = None
    mtbf: float | None = None
    restart_seconds: float = 0.0
    failures: float | None = None
    waste_seconds: float | None = None
    waste_share: float | None = None
    optimum_interval: float | None = None
    optimum_saves: int | None = None
    optimum_waste_seconds: float | None = None
    optimum_waste_share: float | None = None
    checkpoint_bytes: int | None = None
    peak_bytes: int | None = None
    total_bytes: int | None = None

    @property
    def saving_too_costly(self) -> bool:
        return self.saving_share is not None and self.saving_share > SAVING_SHARE_WARNING

    @property
    def wasteful(self) -> bool:
        return (
            self.waste_seconds is not None
            and self.optimum_waste_seconds is not None
            and self.waste_seconds > WASTE_RATIO_WARNING * self.optimum_waste_seconds
        )

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def cost_report(
    save_steps: Sequence[int],
    total_steps: int,
    step_seconds: float | None,
    *,
    peak_kept: int,
    save_seconds: float | None = None,
    mtbf: float | None = None,
    restart_seconds: float | None = None,
    checkpoint_bytes: int | None = None,
    peak_on_disk: int | None = None,
) -> CostReport:
    """The report for a run of ``total_steps`` that saves at ``save_steps``.

    ``peak_on_disk``: the most checkpoints on disk at once (the simulation's, counting the one being
    written before retention prunes); ``peak_kept`` when not given."""
    saves = len(save_steps)
    fields: dict = {"saves": saves, "save_seconds": save_seconds, "checkpoint_bytes": checkpoint_bytes,
                    "mtbf": mtbf, "restart_seconds": restart_seconds or 0.0}
    if checkpoint_bytes is not None:
        at_once = peak_on_disk if peak_on_disk is not None else peak_kept
        fields.update(peak_bytes=at_once * checkpoint_bytes, total_bytes=saves * checkpoint_bytes)
    run = total_steps * step_seconds if step_seconds is not None else None
    fields["run_seconds"] = run
    if save_seconds is not None:
        fields["saving_seconds"] = saves * save_seconds
        if run is not None:
            fields["saving_share"] = saves * save_seconds / run
    if run is None or step_seconds is None:  # run is None exactly when step_seconds is
        return CostReport(**fields)
    rework = rework_per_failure(save_steps, total_steps, step_seconds)
    fields["rework_seconds"] = rework
    if mtbf is None:
        return CostReport(**fields)
    restart = fields["restart_seconds"]
    failures = run / mtbf
    fields["failures"] = failures
    if save_seconds is None:
        return CostReport(**fields)
    waste = saves * save_seconds + failures * (rework + restart)
    interval = daly_interval(save_seconds, mtbf)
    if interval <= 0:  # a free save: the optimum is to save all the time; report the schedule only
        return CostReport(**fields, waste_seconds=waste, waste_share=waste / run)
    optimum_saves, optimum_waste = _periodic_waste(interval, run, save_seconds, mtbf, restart)
    return CostReport(
        **fields,
        waste_seconds=waste,
        waste_share=waste / run,
        optimum_interval=interval,
        optimum_saves=optimum_saves,
        optimum_waste_seconds=optimum_waste,
        optimum_waste_share=optimum_waste / run,
    )


# -- text ------------------------------------------------------------------------


def _pct(share: float) -> str:
    return f"{share * 100:.3g}%" if share < 0.1 else f"{share * 100:.1f}%"


def report_lines(report: CostReport) -> list[str]:
    """The report as ``check`` prints it: (label, text) rows joined with the label padded."""
    from .quantities import format_bytes, format_seconds

    rows: list[tuple[str, str]] = []
    if report.saving_seconds is not None:
        text = f"{report.saves} saves x {format_seconds(report.save_seconds)} = {format_seconds(report.saving_seconds)}"
        if report.saving_share is not None:
            text += f", {_pct(report.saving_share)} of the run's training time"
        rows.append(("saving", text))
    if report.rework_seconds is not None:
        rows.append(("rework", f"{format_seconds(report.rework_seconds)} of training lost per failure on average "
                               "(a failure at a uniformly random instant)"))
    if report.failures is not None:
        text = f"{report.failures:.3g} expected failure{'s' if report.failures != 1 else ''} (mtbf {format_seconds(report.mtbf)}"
        text += f", {format_seconds(report.restart_seconds)} to restart)" if report.restart_seconds else ")"
        rows.append(("failures", text))
    if report.waste_share is not None:
        text = f"this policy wastes {_pct(report.waste_share)} ({format_seconds(report.waste_seconds)})"
        if report.optimum_interval is not None and report.optimum_waste_share is not None:
            text += (f"; saving every {format_seconds(report.optimum_interval)} would waste "
                     f"{_pct(report.optimum_waste_share)} ({format_seconds(report.optimum_waste_seconds)}, "
                     "the Young/Daly interval)")
        rows.append(("waste", text))
    if report.peak_bytes is not None and report.total_bytes is not None and report.checkpoint_bytes is not None:
        # cost_report sets the three together
        rows.append(("disk", f"at most {format_bytes(report.peak_bytes)} at once (with the checkpoint being "
                             "written before retention prunes), "
                             f"{format_bytes(report.total_bytes)} written in all "
                             f"({format_bytes(report.checkpoint_bytes)} a checkpoint)"))
    return [f"{label:<8} {text}" for label, text in rows]


def report_warnings(report: CostReport) -> list[str]:
    """The cost report's warnings: saving over 10% of the run, waste over twice the optimum."""
    from .quantities import format_seconds

    out = []
    if report.saving_too_costly and report.saving_share is not None:
        out.append(f"saving takes {_pct(report.saving_share)} of the run's training time (more than "
                   f"{SAVING_SHARE_WARNING:.0%}): save less often, or save asynchronously")
    if report.wasteful and report.waste_share is not None and report.optimum_waste_share is not None:
        out.append(f"this policy wastes {_pct(report.waste_share)} of the run, more than twice the "
                   f"{_pct(report.optimum_waste_share)} of saving every {format_seconds(report.optimum_interval)} "
                   '(the Young/Daly interval); consider kind = "adaptive" with mtbf')
    return out

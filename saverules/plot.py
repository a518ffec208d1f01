"""Draw the save schedules ``check`` simulates: ``python -m saverules.check POLICY... --plot FILE``.

One row per policy file, on a step axis the rows share (with each row's training
time on a second axis above it when its step time is known).  In a row, every
save is a tick coloured by the rule that made it (its first reason); a triangle
marks each checkpoint kept at the end, and the saves retention deleted are faded.
The largest gap is shaded and labelled with the same words ``check`` prints, epoch
ends are dotted lines, the steps that are in no checkpoint (``final = false``) are
hatched, and the part of a long run whose saves are counted but not listed is
hatched and its count written in.

A row holds one lane per storage tier: one for a policy without a ``[durable]``
table, and for one with it a local lane (every local save, durable promotions
included) above a durable lane (see :mod:`saverules.engine.tiers`).

Only this module imports matplotlib, and only when a plot is asked for: it is the
optional extra ``saverules[plot]``.  Every artist that carries information has a
``gid`` (in an SVG, the ``id`` of its group), so that tests and tools can read back
what was drawn: ``saves-R-L-K`` (the saves of row R, lane L, rule K), ``kept-R-L``,
``gap-R`` and ``gap-label-R``, ``unsaved-R``, ``unlisted-R`` and ``unlisted-label-R``,
``epochs-R``, ``legend``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .check import _plural, gap_text
from .engine.quantities import format_seconds
from .engine.rules import static_reason

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .check import Report
    from .engine.simulate import Simulation
    from .engine.tiers import TierSimulation

SUFFIXES = (".png", ".svg")
INSTALL = "pip install 'saverules[plot]'"
#: Beyond this many epoch ends in a row, the epoch lines are not drawn (a note says so).
MAX_EPOCH_LINES = 200
WIDTH_IN = 11.0
DPI = 100
DELETED_ALPHA = 0.3
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f", "#d62728")


class PlotError(Exception):
    """Why a plot cannot be made: bad usage (exit 2), with what to do."""


def check_target(path: str) -> None:
    """Raise :class:`PlotError` unless ``path`` names a .png or .svg file in a folder that exists."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise PlotError(f"--plot {path}: the file must end in .png or .svg (got "
                        f"{suffix or 'no suffix'}); e.g. --plot schedule.png")
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise PlotError(f"--plot {path}: the folder {folder} does not exist; create it or write the plot elsewhere")


def require() -> None:
    """Raise :class:`PlotError` when matplotlib is not installed, saying what to install."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotError(f"--plot needs matplotlib, which is not installed: {INSTALL}") from None


# -- what to draw ---------------------------------------------------------------


@dataclass(frozen=True)
class Lane:
    """The saves of one storage tier: (step, reasons) in order, and the steps kept at the end."""

    name: str
    saves: tuple[tuple[int, tuple[str, ...]], ...]
    kept: frozenset[int]


@dataclass(frozen=True)
class Span:
    """A stretch of steps (start, end] and what to write on it."""

    start: int
    end: int
    label: str


@dataclass(frozen=True)
class Row:
    """One policy file's schedule, ready to draw."""

    title: str
    total_steps: int
    steps_per_epoch: int | None
    step_seconds: float | None
    lanes: tuple[Lane, ...]
    gap: Span | None = None        # the largest gap, labelled as check prints it
    unsaved: Span | None = None    # the steps after the last save, when final = false leaves them unsaved
    unlisted: Span | None = None   # where saves are counted, not listed


def lanes_of(sim: Simulation, tiers: TierSimulation | None = None) -> tuple[Lane, ...]:
    """One lane for a policy of one tier; with a ``[durable]`` tier, the local lane then the durable one.

    The local lane of a policy with tiers shows every local save, the durable
    saves' promotions included (a durable save commits a local checkpoint
    first), and what the local retention keeps; the durable lane shows the
    durable tier's saves and what its retention keeps.
    """
    if tiers is None:
        return (Lane("saves", tuple(sim.saves) + tuple(sim.last_saves), frozenset(sim.kept)),)
    durable = tiers.durable
    return (
        Lane("local", tuple(tiers.local_saves), frozenset(tiers.local_kept)),
        Lane("durable", tuple(durable.saves) + tuple(durable.last_saves), frozenset(durable.kept)),
    )


def largest_gap(sim: Simulation) -> tuple[int, int]:
    """(start, end) of the first largest gap between saves, from step 0 to where the listing stops."""
    bounds = [0] + [step for step, _ in sim.saves]
    if bounds[-1] != sim.listed_to:
        bounds.append(sim.listed_to)
    for a, b in zip(bounds, bounds[1:]):
        if b - a == sim.max_gap_steps:
            return a, b
    raise AssertionError("the simulation's max_gap_steps is no gap between its saves")  # pragma: no cover


def _time(steps: int, step_seconds: float | None) -> str:
    return "" if step_seconds is None else f", {format_seconds(steps * step_seconds)} of training"


def row_of(report: Report) -> Row | str:
    """The row to draw for one checked file, or why it has none."""
    if report.errors:
        return f"{report.file}: not drawn, it has errors (listed above)"
    sim = report.simulation
    if sim is None:
        why = report.notes[-1].message if report.notes else "not simulated"
        return f"{report.file}: not drawn, {why}"
    start, end = largest_gap(sim)
    gap = Span(start, end, f"largest gap: {gap_text(sim)}")
    unsaved = None
    tail = sim.unsaved_tail
    if tail:
        last = sim.total_steps - tail
        which = f"step {last + 1:,} is" if tail == 1 else f"steps {last + 1:,}-{sim.total_steps:,} are"
        unsaved = Span(last, sim.total_steps, f"{which} in no checkpoint "
                                              f"({_plural(tail, 'step')}{_time(tail, sim.step_seconds)}): final = false")
    unlisted = None
    if not sim.complete:
        end_of = sim.last_saves[0][0] if sim.last_saves else sim.total_steps
        if sim.save_count is not None:
            n = sim.save_count - len(sim.saves) - len(sim.last_saves)
            what = f"{n:,} more saves here, counted, not drawn"
        else:
            what = "more saves here, not counted for this policy"
        unlisted = Span(sim.listed_to, end_of, f"{what} (a simulation lists at most {len(sim.saves):,})")
    if sim.complete:
        count = _plural(len(sim.saves), "save")
    elif sim.save_count is not None:
        count = f"{sim.save_count:,} saves ({len(sim.saves) + len(sim.last_saves):,} drawn)"
    else:
        count = f"more than {len(sim.saves):,} saves ({len(sim.saves):,} drawn)"
    upto = "" if sim.complete else f" at step {sim.listed_to:,}"
    title = f"{report.file}: {count}, {len(sim.kept):,} kept at the end{upto}"
    lanes = lanes_of(sim, report.tiers)
    return Row(title, sim.total_steps, sim.steps_per_epoch, sim.step_seconds, lanes, gap, unsaved, unlisted)


# -- drawing ----------------------------------------------------------------------


def _step_label(x: float, _pos: object = None) -> str:
    a = abs(x)
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if a >= scale:
            if a >= 1e15:
                return f"{x:.3g}"
            return f"{x / scale:g}{suffix}"
    return f"{x:g}"


def _time_unit(seconds: float) -> tuple[float, str]:
    if seconds >= 2 * 86400:
        return 86400.0, "days"
    if seconds >= 2 * 3600:
        return 3600.0, "hours"
    if seconds >= 120:
        return 60.0, "minutes"
    return 1.0, "seconds"


class _Colours:
    """One colour per rule, the same in every row, in the order rules first appear."""

    def __init__(self) -> None:
        self.of: dict[str, str] = {}

    def __call__(self, rule: str) -> str:
        if rule not in self.of:
            self.of[rule] = PALETTE[len(self.of) % len(PALETTE)]
        return self.of[rule]


def _text_at(ax: Axes, span: Span, y: float, va: str, gid: str, colour: str) -> None:
    """The span's label over its middle, kept inside the axes near either end."""
    lo, hi = ax.get_xlim()
    mid = (span.start + span.end) / 2
    at = (mid - lo) / (hi - lo)
    ha, x = ("center", mid)
    if at < 0.25:
        ha, x = "left", max(span.start, lo)
    elif at > 0.75:
        ha, x = "right", min(span.end, hi)
    ax.text(x, y, span.label, ha=ha, va=va, fontsize=8, color=colour, gid=gid,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def _draw_row(ax: Axes, r: int, row: Row, colours: _Colours, seen: dict[str, bool]) -> None:
    import matplotlib.ticker as mticker

    n = len(row.lanes)
    ax.set_ylim(n - 0.3, -1.15)  # lane 0 on top; room above it for the gap's label
    ax.set_yticks(range(n), [lane.name for lane in row.lanes], fontsize=8)
    ax.tick_params(axis="y", length=0)
    for side in ("left", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(row.title, loc="left", fontsize=9)
    ax.hlines(range(n), 0, row.total_steps, color="#cccccc", linewidth=1, zorder=1)
    ax.axvline(row.total_steps, color="#999999", linewidth=0.8, zorder=1)
    if row.steps_per_epoch:
        ends = row.total_steps // row.steps_per_epoch
        if 0 < ends <= MAX_EPOCH_LINES:
            xs = [row.steps_per_epoch * (i + 1) for i in range(ends)]
            ax.vlines(xs, -1.15, n - 0.3, colors="#555555", linestyles=":", linewidth=0.9, zorder=1,
                      gid=f"epochs-{r}")
            seen["epoch"] = True
        elif ends > MAX_EPOCH_LINES:
            note = ax.set_title(f"{ends:,} epochs of {row.steps_per_epoch:,} steps end: too many to draw",
                                loc="right", fontsize=7, color="#555555")
            note.set_gid(f"epochs-note-{r}")
    for li, lane in enumerate(row.lanes):
        by_rule: dict[str, list[int]] = {}
        for step, reasons in lane.saves:
            by_rule.setdefault(static_reason(reasons[0]) if reasons else "manual", []).append(step)
        for rule, steps in by_rule.items():
            colour = colours(rule)
            from matplotlib.colors import to_rgba

            rgba = [to_rgba(colour, 1.0 if s in lane.kept else DELETED_ALPHA) for s in steps]
            k = list(colours.of).index(rule)
            ax.scatter(steps, [li] * len(steps), marker="|", s=260, linewidths=1.6, c=rgba, zorder=3,
                       gid=f"saves-{r}-{li}-{k}")
            if len(steps) > len([s for s in steps if s in lane.kept]):
                seen["deleted"] = True
        kept = sorted(lane.kept)
        if kept:
            ax.scatter(kept, [li - 0.42] * len(kept), marker="v", s=22, c="black", zorder=4, gid=f"kept-{r}-{li}")
            seen["kept"] = True
    if row.gap is not None:
        ax.axvspan(row.gap.start, row.gap.end, ymin=0.0, ymax=1.0, color="#d62728", alpha=0.10, linewidth=0,
                   zorder=0, gid=f"gap-{r}")
        _text_at(ax, row.gap, -0.78, "center", f"gap-label-{r}", "#b01c1c")
        seen["gap"] = True
    if row.unsaved is not None:
        ax.axvspan(row.unsaved.start, row.unsaved.end, facecolor="none", edgecolor="#d62728", hatch="///",
                   linewidth=0, zorder=0, gid=f"unsaved-{r}")
        _text_at(ax, row.unsaved, n - 0.55, "center", f"unsaved-label-{r}", "#b01c1c")
        seen["unsaved"] = True
    if row.unlisted is not None:
        ax.axvspan(row.unlisted.start, row.unlisted.end, facecolor="#eeeeee", edgecolor="#999999", hatch="..",
                   linewidth=0, zorder=0, gid=f"unlisted-{r}")
        _text_at(ax, row.unlisted, n - 0.55, "center", f"unlisted-label-{r}", "#333333")
        seen["unlisted"] = True
    if row.step_seconds is not None:
        secs = row.step_seconds
        unit, name = _time_unit(row.total_steps * secs)
        scale = secs / unit  # steps to the time unit

        def to_time(steps: Any) -> Any:
            return steps * scale

        def to_steps(time: Any) -> Any:
            return time / scale

        top = ax.secondary_xaxis("top", functions=(to_time, to_steps))
        top.tick_params(labelsize=7)
        top.xaxis.set_major_formatter(mticker.FuncFormatter(_step_label))
        top.set_xlabel(f"training time ({name}, {secs:g} s/step)", fontsize=7)
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))  # steps are whole
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(_step_label))
    ax.tick_params(axis="x", labelsize=8)


def figure(rows: Sequence[Row | str]) -> Figure:
    """The figure for these rows (a string stands for a file that is not drawn, and says why)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    drawn = [row for row in rows if isinstance(row, Row)]
    skipped = [row for row in rows if isinstance(row, str)]
    heights = [0.8 + 0.6 * len(row.lanes) + (0.3 if row.step_seconds is not None else 0.0) for row in drawn]
    height = sum(heights) + 0.9 + 0.2 * len(skipped)
    fig = Figure(figsize=(WIDTH_IN, max(height, 1.6)), dpi=DPI, layout="constrained")
    colours = _Colours()
    seen: dict[str, bool] = {}
    if drawn:
        axes = fig.subplots(len(drawn), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
        axes[0].set_xlim(0, max(row.total_steps for row in drawn) * 1.01)
        for r, (ax, row) in enumerate(zip(axes, drawn)):
            _draw_row(ax, r, row, colours, seen)
        axes[-1].set_xlabel("step", fontsize=8)
    if skipped:
        fig.supxlabel("\n".join(skipped), fontsize=8, color="#b01c1c")
    handles: list[Any] = [Line2D([], [], color=c, marker="|", linestyle="none", markersize=11, markeredgewidth=1.6,
                                 label=rule) for rule, c in colours.of.items()]
    # a rule that fired only beside an earlier reason colours no save, but is named too
    also = {static_reason(reason): None for row in drawn for lane in row.lanes for _, reasons in lane.saves
            for reason in reasons[1:]}
    handles += [Line2D([], [], color="none", marker="|", linestyle="none", label=f"{rule}: fired, always with an "
                       "earlier reason") for rule in also if rule not in colours.of]
    extra = (
        ("kept", Line2D([], [], color="black", marker="v", linestyle="none", markersize=5,
                        label="kept at the end")),
        ("deleted", Line2D([], [], color="#444444", alpha=DELETED_ALPHA, marker="|", linestyle="none",
                           markersize=11, markeredgewidth=1.6, label="deleted by retention (faded)")),
        ("epoch", Line2D([], [], color="#555555", linestyle=":", label="epoch end")),
        ("gap", Patch(color="#d62728", alpha=0.15, label="largest gap")),
        ("unsaved", Patch(facecolor="none", edgecolor="#d62728", hatch="///", label="in no checkpoint")),
        ("unlisted", Patch(facecolor="#eeeeee", edgecolor="#999999", hatch="..", label="saves counted, not drawn")),
    )
    handles += [h for key, h in extra if seen.get(key)]
    if handles:
        longest = max(len(str(h.get_label())) for h in handles)
        ncols = 1 if longest > 70 else 2 if longest > 38 else 4
        legend = fig.legend(handles=handles, loc="outside lower center", ncols=min(ncols, len(handles)), fontsize=8,
                            frameon=False,
                            title="the rule that made each save (its first reason)" if colours.of else None,
                            title_fontsize=8)
        legend.set_gid("legend")
        rows_of_legend = -(-len(handles) // min(ncols, len(handles)))
        fig.set_size_inches(WIDTH_IN, max(height, 1.6) + 0.18 * max(0, rows_of_legend - 2))
    return fig


def plot(reports: Sequence[Report], path: str, log: Any = None) -> tuple[int, int]:
    """Draw ``reports`` into ``path`` (.png or .svg); the image's size in pixels.

    ``log`` (a text stream, or None) gets a line per stage.
    """
    import matplotlib

    rows = [row_of(r) for r in reports]
    for row in rows:
        if log is not None and isinstance(row, Row):
            saves = sum(len(lane.saves) for lane in row.lanes)
            print(f"plot: drawing {_plural(saves, 'save')} of {row.title.split(': ')[0]}", file=log, flush=True)
    fig = figure(rows)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "saverules",
                                "path.simplify": True}):
        fig.savefig(path, metadata={"Date": None} if path.lower().endswith(".svg") else None)
    width, height = fig.get_size_inches() * fig.dpi
    if log is not None:
        print(f"plot: wrote {path} ({int(width)} x {int(height)} px)", file=log, flush=True)
    return int(width), int(height)

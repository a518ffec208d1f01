"""Count a simulated run's saves by arithmetic, for runs with more saves than can be listed.

In a run asked at every step, most rules fire at a step by a property of the
step alone: ``every_steps`` at multiples of its interval, ``at_steps`` at its
steps, ``piecewise`` at multiples within each segment, ``window`` inside its
bounds, a simulated ``epoch_end`` at multiples of the epoch length, ``final``
at the last step; ``on_signal`` and ``improved`` (whatever its ``top``) never
fire in a simulation without events or metrics.  Such a rule is a union of *pieces*: the multiples
of ``k`` in ``(lo, hi]``.  ``all`` intersects pieces, ``any`` joins them,
``not`` of plain ranges takes their complement.

The saves of a run are the steps at which any top-level rule fires, so their
number is the size of a union of pieces, found by inclusion-exclusion over the
moduli active between breakpoints.  The count is exact or not given at all:
rules whose firing depends on the run's history (``tail``, ``every_time``,
``not`` of a periodic rule), a rule with an ``adaptive`` rule in it (its
interval moves with the measured save cost, and its reason names the interval
used) and unions too costly to count (more than :data:`WORK` terms) give
``None``, which the caller reports as unknown.
"""
from __future__ import annotations

from math import gcd

from .compile import (
    INF,
    Adaptive,
    All,
    Any_,
    AtSteps,
    EpochEnd,
    EverySteps,
    EveryTime,
    Final,
    Improved,
    Not,
    OnSignal,
    Piecewise,
    Tail,
    Window,
)

Piece = tuple[int, int, int]  # multiples of k in (lo, hi]

#: Inclusion-exclusion terms (and pieces) one count may spend before it gives up.
WORK = 400_000


class _TooCostly(Exception):
    pass


class _Budget:
    def __init__(self, work: int):
        self.left = work

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise _TooCostly


def _has_multiple(lo: int, hi: int, k: int) -> bool:
    return lo < hi and hi // k > lo // k


def pieces(node, total: int, steps_per_epoch: int | None, budget: _Budget) -> list[Piece] | None:
    """The steps at which ``node`` fires in a quiet run asked at every step, or None."""
    if isinstance(node, EverySteps):
        return [(0, INF, node.every)]
    if isinstance(node, AtSteps):
        budget.spend(len(node.steps))
        return [(s - 1, s, 1) for s in node.steps]
    if isinstance(node, Piecewise):
        return [(low, high, every) for every, low, high in node.segments if low < high]
    if isinstance(node, Window):
        return [(node.after, node.until, 1)] if node.after < node.until else []
    if isinstance(node, Final):
        return [(total - 1, total, 1)]  # the first decision at the total, in a run that reaches it
    if isinstance(node, EpochEnd):
        return [(0, INF, steps_per_epoch * node.every)] if steps_per_epoch else []
    if isinstance(node, (OnSignal, Improved)):
        return []  # no signals or metrics in this simulation
    if isinstance(node, Adaptive):
        return None  # its interval follows the measured save cost: only simulating each save tells
    if isinstance(node, Any_):
        out: list[Piece] = []
        for child in node.children:
            sub = pieces(child, total, steps_per_epoch, budget)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if isinstance(node, All):
        acc: list[Piece] | None = None
        for child in node.children:
            sub = pieces(child, total, steps_per_epoch, budget)
            if sub is None:
                return None
            if acc is None:
                acc = sub
                continue
            joined = []
            for lo1, hi1, k1 in acc:
                for lo2, hi2, k2 in sub:
                    budget.spend()
                    lo, hi, k = max(lo1, lo2), min(hi1, hi2), k1 // gcd(k1, k2) * k2
                    if _has_multiple(lo, hi, k):
                        joined.append((lo, hi, k))
            acc = joined
        return acc or []
    if isinstance(node, Not):
        sub = pieces(node.children[0], total, steps_per_epoch, budget)
        if sub is None or any(k != 1 for _, _, k in sub):
            return None  # the complement of a periodic set is no union of pieces
        out, start = [], 0
        for lo, hi in _merged((lo, hi) for lo, hi, _ in sub):
            if lo > start:
                out.append((start, lo, 1))
            start = max(start, hi)
        if start < INF:
            out.append((start, INF, 1))
        return out
    return None  # tail, every_time: they depend on the run's history


def _merged(ranges) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def _count_multiples(lo: int, hi: int, moduli: list[int], budget: _Budget) -> int:
    """How many steps in (lo, hi] are a multiple of at least one of ``moduli``."""
    if lo >= hi or not moduli:
        return 0
    if 1 in moduli:
        return hi - lo
    # a multiple of a multiple is already counted: keep only the moduli no other divides
    ks = sorted(set(moduli))
    kept: list[int] = []
    for k in ks:
        budget.spend(len(kept) + 1)
        if not any(k % small == 0 for small in kept):
            kept.append(k)
    total = 0
    stack = [(0, 1, 1)]  # (next index, lcm so far, sign)
    while stack:
        start, lcm, sign = stack.pop()
        for i in range(start, len(kept)):
            budget.spend()
            k = kept[i]
            combined = lcm // gcd(lcm, k) * k
            if combined > hi:
                continue  # no multiple in range, nor of any superset
            total += sign * (hi // combined - lo // combined)
            stack.append((i + 1, combined, -sign))
    return total


#: A stretch this short is counted by marking its steps when inclusion-exclusion costs too much.
SIEVE_STEPS = 1 << 22


def _sieve(all_pieces: list[Piece], lo: int, hi: int, budget: _Budget) -> int:
    marks = bytearray(hi - lo)  # step lo + 1 + i is marks[i]
    for plo, phi, k in all_pieces:
        plo, phi = max(plo, lo), min(phi, hi)
        first = (plo // k + 1) * k
        if first <= phi:
            n = (phi - first) // k + 1
            budget.spend(1 + n // 64)
            marks[first - lo - 1:phi - lo:k] = b"\x01" * n
    return marks.count(1)


def count_union(all_pieces: list[Piece], lo: int, hi: int, budget: _Budget) -> int:
    """How many steps in (lo, hi] lie in at least one piece."""
    if hi - lo <= SIEVE_STEPS and len(all_pieces) > 64:
        # many pieces over a short stretch: try the arithmetic, and mark the steps if it costs too much
        given = min(budget.left, WORK // 8)
        trial = _Budget(given)
        try:
            count = _count_union(all_pieces, lo, hi, trial)
        except _TooCostly:
            budget.spend(WORK // 8)
            return _sieve(all_pieces, lo, hi, budget)
        budget.spend(given - trial.left)  # what the trial cost (charging more starved the counts after it)
        return count
    return _count_union(all_pieces, lo, hi, budget)


def _count_union(all_pieces: list[Piece], lo: int, hi: int, budget: _Budget) -> int:
    events: dict[int, list[tuple[int, int]]] = {}
    for plo, phi, k in all_pieces:
        plo, phi = max(plo, lo), min(phi, hi)
        if _has_multiple(plo, phi, k):
            events.setdefault(plo, []).append((k, 1))
            events.setdefault(phi, []).append((k, -1))
    budget.spend(len(events))
    active: dict[int, int] = {}
    count = 0
    points = sorted(events)
    for here, nxt in zip(points, points[1:] + [None]):
        for k, change in events[here]:
            active[k] = active.get(k, 0) + change
            if not active[k]:
                del active[k]
        if nxt is not None and active:
            count += _count_multiples(here, nxt, list(active), budget)
    return count


def _split(node, total, steps_per_epoch, budget):
    """(pieces, history) for a node: where it fires by its step alone, and the
    rules that depend on the run's history (``("tail", interval)``,
    ``("time", seconds)``) that may make it fire elsewhere; None if neither says."""
    if isinstance(node, (EveryTime, Tail)):
        return [], [("time", node.seconds) if isinstance(node, EveryTime) else ("tail", node.interval)]
    if isinstance(node, Any_):
        out, history = [], []
        for child in node.children:
            sub = _split(child, total, steps_per_epoch, budget)
            if sub is None:
                return None
            out += sub[0]
            history += sub[1]
        return out, history
    if isinstance(node, All):
        parts = [_split(child, total, steps_per_epoch, budget) for child in node.children]
        guarded = [h for part in parts if part is not None and part[1] and not part[0] for h in part[1]]
        if guarded:  # all() fires only where such a child fires
            return [], guarded
    sub = pieces(node, total, steps_per_epoch, budget)
    return None if sub is None else (sub, [])


class Rest:
    """How the saves after the listed ones are found: counted up to ``upto``, then simulated."""

    def __init__(self, upto, count, by_reason, last_save):
        self.upto = upto  # saves in (listed_to, upto] are counted
        self.count = count
        self.by_reason = by_reason  # those saves per reason
        self.last_save = last_save  # the last save at or before upto (None: none yet)


def plan_rest(compiled, total: int, steps_per_epoch: int | None, step_seconds: float | None,
              after: int, last_listed: int | None, work: int = WORK) -> Rest | None:
    """Count the saves of a quiet run asked at every step in (after, upto], for the
    largest ``upto`` below which no rule that depends on the run's history can fire;
    None where that cannot be counted exactly within ``work``.

    ``tail`` and ``every_time`` depend on when the last save was.  If some rule
    saves at every multiple of ``g`` across the rest of the run, a save is never
    more than ``g`` steps back: ``tail`` cannot fire before step total - g, and
    ``every_time`` cannot fire at all when ``g`` steps take less than its interval.
    """
    budget = _Budget(work)
    try:
        by_reason: dict[str, list[Piece]] = {}  # two rules written alike give one reason
        history = []
        for node, reason in compiled:
            if any(isinstance(sub, Adaptive) for sub in node.walk()):
                return None  # see pieces(); its reasons also differ from save to save
            split = _split(node, total, steps_per_epoch, budget)
            if split is None:
                return None
            by_reason.setdefault(reason, []).extend(split[0])
            history += split[1]
        union = [piece for sub in by_reason.values() for piece in sub]
        upto = total
        if history:
            covering = [k for lo, hi, k in union if lo <= after - k and hi >= total]
            if not covering:
                return None
            gap = min(covering)
            for what, value in history:
                if what == "tail":
                    upto = min(upto, total - gap - 1)
                elif step_seconds is not None:  # every_time: does the clock between two saves reach it?
                    slack = 4 * total * step_seconds * 2.0 ** -52 + 1e-9 * value  # rounding, with room
                    if gap * step_seconds + slack >= value:
                        return None  # it may fire anywhere: only simulating each save tells where
            upto = max(upto, after)
        count = count_union(union, after, upto, budget)
        counted = {}
        for reason, sub in by_reason.items():
            n = count_union(sub, after, upto, budget)
            if n:
                counted[reason] = n
        last = last_listed
        for lo, hi, k in union:
            top = min(hi, upto)
            m = top // k * k
            if m > lo and m > after and (last is None or m > last):
                last = m
        return Rest(upto, count, counted, last)
    except _TooCostly:
        return None

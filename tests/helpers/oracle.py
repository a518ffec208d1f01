"""A naive reference interpreter for save policies, written from the semantics alone.

It reads the rule *models* (``saverules.engine.rules``) and the :class:`Policy` fields
directly and decides one Progress at a time with the plainest code that says
what docs/rules.md says.  It shares nothing with ``saverules.engine.compile`` or
``saverules.engine.decider``: no precomputed next steps, no quiet path, no node
objects.  Property tests compare the engine with it.

What it does borrow from the package is data and naming: the rule models, the
reason strings (:func:`saverules.engine.rules.describe`) and the Progress a simulated
loop reports at a step (:func:`saverules.engine.simulate.progress_at`).
"""
from __future__ import annotations

import math
import signal as _signal
from collections.abc import Sequence

from saverules.engine.errors import PolicyError
from saverules.engine.progress import Checkpoint, Progress
from saverules.engine.quantities import Share, format_seconds
from saverules.engine.rules import (
    AdaptiveRule,
    AllRule,
    AnyRule,
    AtStepsRule,
    EpochEndRule,
    EveryStepsRule,
    EveryTimeRule,
    FinalRule,
    ImprovedRule,
    NotRule,
    OnSignalRule,
    PiecewiseRule,
    TailRule,
    WindowRule,
    describe,
)
from saverules.engine.simulate import progress_at

__all__ = [
    "BackwardsStep", "Oracle", "oracle_run", "oracle_saves", "oracle_retain", "oracle_simulation", "NoTotal",
    "oracle_interval", "oracle_daly", "oracle_tiers", "tier_docs", "TieredOracle", "TierRun", "oracle_tier_run",
]


class BackwardsStep(Exception):
    """A decision asked for a step below the previous one (steps never go backwards)."""


class BackwardsTime(Exception):
    """A decision carried a Progress.time below the latest one a decision saw (the clock never goes back)."""


class NoTotal(Exception):
    """A share of the run was needed but no total_steps is known."""


def steps_of(value, total: int | None) -> int | None:
    """An integer step count, or ceil(total * P / 100) (never below 1) for "P%"."""
    if value is None:
        return None
    if isinstance(value, Share):
        if total is None:
            raise NoTotal(value.text)
        num = total * value.percent.numerator
        den = 100 * value.percent.denominator
        steps = num // den + (1 if num % den else 0)
        return steps if steps >= 1 else 1
    return value


def oracle_daly(c: float, m: float) -> float:
    """Daly's higher-order optimum, as docs/rules.md writes it."""
    if c < 2 * m:
        return math.sqrt(2 * c * m) * (1 + math.sqrt(c / (2 * m)) / 3 + (c / (2 * m)) / 9) - c
    return m


def oracle_interval(rule: AdaptiveRule, reports: Sequence[tuple[float, float]]) -> float:
    """T = min(max_every, max(min_every, c / max_overhead, T_daly(c, M), w)) with (c, w) the
    mean of the last three reports; min_every before any report."""
    min_every = rule.min_every.seconds if rule.min_every is not None else 60.0
    if not reports:
        return min_every
    last = list(reports)[-3:]
    c = sum(r[0] for r in last) / len(last)
    w = sum(r[1] for r in last) / len(last)
    candidates = [min_every, w]
    if rule.max_overhead is not None:
        candidates.append(c / float(rule.max_overhead.percent / 100))
    if rule.mtbf is not None:
        candidates.append(oracle_daly(c, rule.mtbf.seconds))
    t = max(candidates)
    if rule.max_every is not None and rule.max_every.seconds < t:
        t = rule.max_every.seconds
    return t


def _float_metric(value) -> float | None:
    if isinstance(value, bool):
        value = float(value)
    value = float(value)
    return value if math.isfinite(value) else None


class Oracle:
    """Decides like a Decider, from first principles, for one run."""

    def __init__(self, policy, total_steps: int | None = None):
        self.policy = policy
        if total_steps is None and policy.run is not None:
            total_steps = policy.run.total_steps
        self.total = total_steps
        self.prev = 0  # the previously decided step
        self.saved: set = set()
        self.last_save_step: int | None = None
        self.clock_anchor: float | None = None  # time of the last save, or of the first decision
        self.latest_time: float | None = None  # the latest Progress.time a decision saw
        self.final_fired: dict[tuple, int] = {}  # final rule path -> the total it fired for
        self.fired_values: dict[tuple, list[float]] = {}  # improved rule path -> every value it fired on
        self.costs: list[tuple[float, float]] = []  # every (stall, write) reported, oldest first
        self.cost_unknown = False  # a simulation given no save cost: adaptive rules are not simulated

    # -- one decision -----------------------------------------------------------
    def decide(self, p: Progress) -> tuple[bool, tuple[str, ...]]:
        if p.step < self.prev:
            raise BackwardsStep(p.step, self.prev)  # refused before anything changes
        if p.time is not None and self.latest_time is not None and p.time < self.latest_time:
            raise BackwardsTime(p.time, self.latest_time)  # refused before anything changes
        if p.total_steps is not None:
            self.total = p.total_steps
        if self.clock_anchor is None and p.time is not None:
            self.clock_anchor = p.time
        try:
            self._check_resolvable()
        except NoTotal as exc:
            raise PolicyError([]) from exc
        reasons: list[str] = []
        if self.policy.final:
            if self._final(("final",), p):
                reasons.append("final")
        for i, rule in enumerate(self.policy.rules):
            if self._fires(rule, ("rules", i), p):
                name = describe(rule, self._annotate)
                if name not in reasons:
                    reasons.append(name)
        save = bool(reasons) and p.step not in self.saved
        self.prev = p.step
        if p.time is not None:
            self.latest_time = p.time
        if save:
            self.saved.add(p.step)
            self.last_save_step = p.step
            if p.time is not None:
                self.clock_anchor = p.time
            return True, tuple(reasons)
        return False, ()

    def _annotate(self, rule) -> dict:
        if isinstance(rule, AdaptiveRule):
            return {"interval": format_seconds(oracle_interval(rule, self.costs))}
        return {}

    def note_cost(self, stall: float, write: float | None = None) -> None:
        self.costs.append((float(stall), float(stall if write is None else write)))

    def note_save(self, step: int, time: float | None = None) -> None:
        self.saved.add(step)
        self.last_save_step = step
        if time is not None:
            self.clock_anchor = time

    def resumed_under(self, policy) -> Oracle:
        """An oracle for ``policy`` continuing this run after a restart at the last decision.

        A top-level rule keeps its state only when this run's policy holds the
        same rule (same kind, same parameters); the k-th copy of a rule pairs
        with the k-th copy.  Every other rule starts fresh.
        """
        new = Oracle(policy, self.total)
        new.prev, new.saved, new.last_save_step = self.prev, set(self.saved), self.last_save_step
        new.clock_anchor, new.costs = self.clock_anchor, list(self.costs)
        mapping: dict[tuple, tuple] = {}
        if self.policy.final and policy.final:
            mapping[("final",)] = ("final",)
        old_by_what: dict[tuple, list[int]] = {}
        for i, rule in enumerate(self.policy.rules):
            old_by_what.setdefault((type(rule), rule.model_dump_json()), []).append(i)
        for j, rule in enumerate(policy.rules):
            olds = old_by_what.get((type(rule), rule.model_dump_json()))
            if olds:
                mapping[("rules", olds.pop(0))] = ("rules", j)

        def moved(path: tuple) -> tuple | None:
            for old, now in mapping.items():
                if path[: len(old)] == old:
                    return now + path[len(old):]
            return None

        for table, into in ((self.final_fired, new.final_fired), (self.fired_values, new.fired_values)):
            for path, value in table.items():
                target = moved(path)
                if target is not None:
                    into[target] = value if not isinstance(value, list) else list(value)
        return new

    def _check_resolvable(self) -> None:
        """Shares need a total before any decision, whether or not their rule would fire."""
        for rule in self.policy.rules:
            self._resolve_all(rule)

    def _resolve_all(self, rule) -> None:
        steps_of(rule.after, self.total)
        steps_of(rule.until, self.total)
        for name in ("every", "interval"):
            value = getattr(rule, name, None)
            if not isinstance(value, (int, Share)) or isinstance(value, bool):
                continue
            steps_of(value, self.total)
        if isinstance(rule, AtStepsRule):
            for s in rule.steps:
                steps_of(s, self.total)
        if isinstance(rule, PiecewiseRule):
            for seg in rule.segments:
                steps_of(seg.every, self.total)
                steps_of(seg.until, self.total)
        if isinstance(rule, (AllRule, AnyRule)):
            for child in rule.rules:
                self._resolve_all(child)
        if isinstance(rule, NotRule):
            self._resolve_all(rule.rule)

    # -- the rules ----------------------------------------------------------------
    def _fires(self, rule, path: tuple, p: Progress) -> bool:
        fired = self._fires_kind(rule, path, p)  # always evaluated: rules may keep state
        if rule.after is None and rule.until is None:
            return fired
        after = steps_of(rule.after, self.total) if rule.after is not None else 0
        until = steps_of(rule.until, self.total) if rule.until is not None else math.inf
        in_window = after < p.step <= until
        if isinstance(rule, WindowRule):
            return in_window
        return fired and in_window

    def _fires_kind(self, rule, path: tuple, p: Progress) -> bool:
        step, prev, total = p.step, self.prev, self.total
        if isinstance(rule, EveryStepsRule):
            every = steps_of(rule.every, total)
            # some multiple of `every` in (prev, step]
            return any(m % every == 0 for m in _crossed(prev, step, every))
        if isinstance(rule, AtStepsRule):
            listed = {steps_of(s, total) for s in rule.steps}
            return any(prev < s <= step for s in listed)
        if isinstance(rule, PiecewiseRule):
            low = 0
            for seg in rule.segments:
                every = steps_of(seg.every, total)
                high = steps_of(seg.until, total) if seg.until is not None else math.inf
                # multiples of this segment's `every` that lie in (low, high] and in (prev, step]
                lo, hi = max(prev, low), min(step, high)
                if lo < hi and any(m % every == 0 for m in _crossed(lo, hi, every)):
                    return True
                low = max(low, high)
            return False
        if isinstance(rule, FinalRule):
            return self._final(path, p)
        if isinstance(rule, TailRule):
            if total is None:
                return False
            interval = steps_of(rule.interval, total)
            remaining = total - step
            if not (0 <= remaining < interval):
                return False
            last = self.last_save_step if self.last_save_step is not None else 0
            a = max(last, total - interval)
            return step >= -((-(a + total)) // 2)
        if isinstance(rule, EveryTimeRule):
            if p.time is None or self.clock_anchor is None:
                return False
            # "at least `every` seconds since the anchor", with the threshold
            # anchor + every computed in floating point, as the docs define it
            return p.time >= self.clock_anchor + rule.every.seconds
        if isinstance(rule, EpochEndRule):
            return bool(p.epoch_end) and (p.epoch + 1) % rule.every == 0
        if isinstance(rule, OnSignalRule):
            return _signal_matches(p.signal, rule.signals)
        if isinstance(rule, ImprovedRule):
            if not p.metrics or rule.metric not in p.metrics:
                return False
            value = _float_metric(p.metrics[rule.metric])
            if value is None:
                return False
            # it ranks among the best `top` values that fired so far, ties going to the
            # earlier value: fewer than `top` of them are not beaten by more than min_delta
            earlier = self.fired_values.setdefault(path, [])
            gain = (lambda w: w - value) if rule.mode == "min" else (lambda w: value - w)
            if sum(1 for w in earlier if not gain(w) > rule.min_delta) >= rule.top:
                return False
            earlier.append(value)
            return True
        if isinstance(rule, AdaptiveRule):
            if p.time is None or self.clock_anchor is None or self.cost_unknown:
                return False
            return p.time >= self.clock_anchor + oracle_interval(rule, self.costs)
        if isinstance(rule, WindowRule):
            return True  # the bounds are applied by _fires
        if isinstance(rule, AllRule):
            results = [self._fires(c, path + ("rules", i), p) for i, c in enumerate(rule.rules)]
            return all(results)
        if isinstance(rule, AnyRule):
            results = [self._fires(c, path + ("rules", i), p) for i, c in enumerate(rule.rules)]
            return any(results)
        if isinstance(rule, NotRule):
            return not self._fires(rule.rule, path + ("rule",), p)
        raise TypeError(type(rule).__name__)

    def _final(self, path: tuple, p: Progress) -> bool:
        total = self.total
        if total is not None and p.step >= total and self.final_fired.get(path) != total:
            self.final_fired[path] = total  # the first decision at or past this total
            return True
        return p.is_last is True


def _crossed(lo: int, hi: int, every: int):
    """The multiples of ``every`` in (lo, hi], found the slow but obvious way for short
    ranges, and by their first and last member for long ones."""
    if hi - lo <= 1024:
        return range(lo + 1, hi + 1)
    first = (lo // every + 1) * every
    return [first] if first <= hi else []


_NAMES = {int(s): s.name for s in _signal.Signals}


def _signal_matches(sig, names) -> bool:
    if sig is False or sig is None or sig == 0 or sig == "":
        return False
    if sig is True:
        return True
    if isinstance(sig, int):
        name = _NAMES.get(sig)
        if name is None:
            return False
    else:
        name = str(sig).strip().upper()
        if not name.startswith("SIG"):
            name = "SIG" + name
    return name in names


# -- runs -----------------------------------------------------------------------------


def oracle_run(policy, progresses: Sequence, total_steps: int | None = None) -> list[tuple[int, tuple[str, ...]]]:
    """Decide over ``progresses`` in order; the saves as [(step, reasons)].

    An item may also be ``("note_save", step, time)``: a save the loop made by
    itself, as ``Decider.note_save`` records it, or ``("note_cost", stall, write)``.
    """
    oracle = Oracle(policy, total_steps)
    saves = []
    for item in progresses:
        if isinstance(item, tuple) and item and item[0] == "note_save":
            oracle.note_save(item[1], item[2])
            continue
        if isinstance(item, tuple) and item and item[0] == "note_cost":
            oracle.note_cost(item[1], item[2])
            continue
        save, reasons = oracle.decide(item)
        if save:
            saves.append((item.step, reasons))
    return saves


def oracle_retain(retention, checkpoints: Sequence[Checkpoint]) -> list[bool]:
    """The keep mask, rule by rule, ORed: the plainest reading of [retention]."""
    n = len(checkpoints)
    if retention is None:
        return [True] * n
    keep = [False] * n
    for i, c in enumerate(checkpoints):
        if i == n - 1 or c.final:
            keep[i] = True  # the newest and the final one are never deleted
        if i >= n - retention.keep_last:
            keep[i] = True
        if retention.keep_every is not None and c.step % retention.keep_every == 0:
            keep[i] = True
    best = retention.keep_best
    if best is not None:

        def value(c):
            if not c.metrics or best.metric not in c.metrics or isinstance(c.metrics[best.metric], bool):
                return None
            try:
                v = float(c.metrics[best.metric])
            except (TypeError, ValueError):
                return None
            return v if math.isfinite(v) else None

        def better(a, b):  # strictly better in this mode
            return a < b if best.mode == "min" else a > b

        values = [value(c) for c in checkpoints]
        for i, v in enumerate(values):
            if v is None:
                continue
            # how many checkpoints rank before this one: strictly better, or equal and earlier
            ahead = sum(
                1 for j, w in enumerate(values) if w is not None and (better(w, v) or (w == v and j < i))
            )
            if ahead < best.n:
                keep[i] = True
    return keep


class OracleSimulation:
    def __init__(self, saves, kept, max_gap_steps, max_gap_seconds, peak_kept, peak_on_disk=0):
        self.saves, self.kept = saves, kept
        self.max_gap_steps, self.max_gap_seconds, self.peak_kept = max_gap_steps, max_gap_seconds, peak_kept
        self.peak_on_disk = peak_on_disk


def oracle_simulation(policy, total_steps: int, steps_per_epoch=None, step_seconds=None, metrics=None,
                      save_seconds=None, write_seconds=None):
    """Brute force: decide at every step 1..total_steps, applying retention after each save.

    The loop's Progress at each step is :func:`saverules.engine.simulate.progress_at`'s, which
    reads epoch ends as the reference loop reports them: at multiples of
    ``steps_per_epoch`` only (none without it), never at a last step that ends no epoch.
    No save is left unlisted here, however many there are.

    With ``save_seconds`` every save reports that cost (and ``write_seconds``, the
    stall when omitted); without it adaptive rules do not fire."""
    oracle = Oracle(policy, total_steps)
    oracle.cost_unknown = save_seconds is None
    saves: list[tuple[int, tuple[str, ...]]] = []
    kept: list[Checkpoint] = []
    peak = on_disk = 0
    for step in range(1, total_steps + 1):
        reported = metrics(step) if metrics is not None else None
        p = progress_at(step, total_steps, steps_per_epoch, step_seconds, reported)
        save, reasons = oracle.decide(p)
        if not save:
            continue
        if save_seconds is not None:
            oracle.note_cost(save_seconds, write_seconds)
        saves.append((step, reasons))
        kept.append(Checkpoint(step, p.time, reported, step == total_steps))
        on_disk = max(on_disk, len(kept))  # the new checkpoint is on disk before retention runs
        mask = oracle_retain(policy.retention, kept)
        kept = [c for c, k in zip(kept, mask) if k]
        peak = max(peak, len(kept))
    points = [0] + [s for s, _ in saves] + [total_steps]
    gap = max(b - a for a, b in zip(points, points[1:]))
    return OracleSimulation(
        saves, [c.step for c in kept], gap, None if step_seconds is None else gap * step_seconds, peak, on_disk
    )


def oracle_saves(policy, total_steps: int, steps_per_epoch=None, step_seconds=None, metrics=None, **costs):
    """The saves [(step, reasons)] of a run asked at every step 1..total_steps."""
    return oracle_simulation(policy, total_steps, steps_per_epoch, step_seconds, metrics, **costs).saves


# -- two tiers (docs/tiers.md) ----------------------------------------------------------------


class OracleTiers:
    def __init__(self, local_saves, local_kept, durable_saves, durable_kept, local_gap, durable_gap):
        self.local_saves, self.local_kept = local_saves, local_kept
        self.durable_saves, self.durable_kept = durable_saves, durable_kept
        self.local_gap, self.durable_gap = local_gap, durable_gap


def tier_docs(doc: dict) -> tuple[dict, dict]:
    """The two tiers of the policy document ``doc`` as documents of their own (local, durable).

    The durable tier is read straight from the document as a policy of its own (its rules, its
    ``final``, default true, its retention, everything else the top level's); the local tier is
    the document without it."""
    durable = doc["durable"]
    local_doc = {k: v for k, v in doc.items() if k != "durable"}
    durable_doc = {k: v for k, v in local_doc.items() if k not in ("rules", "retention", "final")}
    durable_doc["rules"] = durable.get("rules", [])
    durable_doc["final"] = durable.get("final", True)
    if "retention" in durable:
        durable_doc["retention"] = durable["retention"]
    return local_doc, durable_doc


class TieredOracle:
    """Decides like a TieredDecider: one naive Oracle per tier, each counting from its own saves."""

    def __init__(self, doc: dict, total_steps: int | None = None):
        from saverules import Policy

        local_doc, durable_doc = tier_docs(doc)
        self.local_policy, self.durable_policy = Policy.model_validate(local_doc), Policy.model_validate(durable_doc)
        self.local, self.durable = Oracle(self.local_policy, total_steps), Oracle(self.durable_policy, total_steps)

    def decide(self, p: Progress) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
        lsave, lreasons = self.local.decide(p)
        dsave, dreasons = self.durable.decide(p)
        return lsave or dsave, lreasons, dreasons

    def note_save(self, step: int, time: float | None = None, tiers=("local", "durable")) -> None:
        for tier in tiers:
            getattr(self, tier).note_save(step, time)

    def note_cost(self, stall: float, write: float | None = None) -> None:
        self.local.note_cost(stall, write)

    def note_upload_cost(self, seconds: float) -> None:
        self.durable.note_cost(seconds, seconds)

    def resumed_at(self, step: int, time: float | None) -> None:
        """Both tiers as a run resumed from a checkpoint at ``step`` with no rule state: just saved there."""
        for o in (self.local, self.durable):
            o.prev, o.saved, o.last_save_step = step, {step}, step
            o.clock_anchor = time


def oracle_tiers(doc: dict, total_steps: int, steps_per_epoch=None, step_seconds=None, metrics=None) -> OracleTiers:
    """Brute force over both tiers of the policy document ``doc`` (plain data with a ``durable`` table).

    At every step both tiers are asked (:class:`TieredOracle`); the local tier saves when either
    says so (a durable save promotes a local checkpoint) and each tier applies its own retention
    after each of its saves."""
    tor = TieredOracle(doc, total_steps)
    lpol, dpol = tor.local_policy, tor.durable_policy
    tor.local.cost_unknown = tor.durable.cost_unknown = True
    lsaves, dsaves = [], []
    lkept: list[Checkpoint] = []
    dkept: list[Checkpoint] = []
    for step in range(1, total_steps + 1):
        reported = metrics(step) if metrics is not None else None
        p = progress_at(step, total_steps, steps_per_epoch, step_seconds, reported)
        _, lreasons, dreasons = tor.decide(p)
        if dreasons:
            dsaves.append(step)
            dkept.append(Checkpoint(step, p.time, reported, step == total_steps and "final" in dreasons))
            dkept = [c for c, k in zip(dkept, oracle_retain(dpol.retention, dkept)) if k]
        if lreasons or dreasons:
            lsaves.append(step)
            final = step == total_steps and "final" in (lreasons + dreasons)
            lkept.append(Checkpoint(step, p.time, reported, final))
            lkept = [c for c, k in zip(lkept, oracle_retain(lpol.retention, lkept)) if k]

    def gap(steps):
        points = [0] + steps + [total_steps]
        return max(b - a for a, b in zip(points, points[1:]))

    return OracleTiers(lsaves, [c.step for c in lkept], dsaves, [c.step for c in dkept], gap(lsaves), gap(dsaves))


# -- the runtime of two tiers: promotions, the upload queue, the protected set -------------------------


class TierRun:
    """What happened in a run of two tiers (steps name checkpoints: a promotion uploads the local
    checkpoint of its step).  ``events`` is the whole history in order:
    ``("save", step, local_reasons, durable_reasons)``, ``("replaced", old, new)``, ``("upload", step)``
    (started), ``("durable", step)`` (committed), ``("delete", tier, step)``."""

    def __init__(self):
        self.events: list[tuple] = []
        self.local: list[Checkpoint] = []
        self.durable: list[Checkpoint] = []

    @property
    def uploads(self) -> list[int]:
        return [e[1] for e in self.events if e[0] == "durable"]

    @property
    def local_kept(self) -> list[int]:
        return [c.step for c in self.local]

    @property
    def durable_kept(self) -> list[int]:
        return [c.step for c in self.durable]


def oracle_tier_run(doc: dict, total: int, steps_per_epoch=None, step_seconds=None, metrics=None, *,
                    signal_at: int | None = None, durations=(1,), start: int = 0, initial_local=(),
                    initial_durable=(), resumed_from: tuple[str, int] | None = None,
                    save_seconds: float | None = None) -> TierRun:
    """The plainest model of a run of two tiers, from docs/tiers.md and issue 18.

    Steps ``start + 1 .. total`` are decided (a run resumed at ``start``, with the tiers holding
    ``initial_local`` / ``initial_durable``, Checkpoints, and ``resumed_from`` = (tier, step), or a
    new run).  A save commits a local checkpoint; a durable one also asks to promote it.  At most
    one upload runs; the n-th upload started takes ``durations[n % len(durations)]`` steps (>= 1):
    one started at step s is committed just before the decision at step s + d, or when the run
    closes.  A local save for an ``on_signal`` rule is promoted too (a preemption), and the durable
    tier's rules count from it.  Waiting promotions: every pinned one (final, or a signal save) in order, then
    at most one other; a newer promotion replaces a waiting unpinned one.  Retention runs in the
    local tier after each local commit and each upload's end, in the durable tier after each
    upload's commit, and in both once more at close; it never deletes the newest checkpoint of the
    tier, the checkpoint a resume came from until a newer one is committed in that tier, or a local
    checkpoint whose promotion is waiting or running.  With ``save_seconds`` every local save costs
    that much, and every upload costs its duration times ``step_seconds`` (the durable tier's
    adaptive rules plan from it).
    """
    tor = TieredOracle(doc, total)
    lret, dret = tor.local_policy.retention, tor.durable_policy.retention
    run = TierRun()
    run.local, run.durable = list(initial_local), list(initial_durable)
    resumed = {"local": None, "durable": None}
    if resumed_from is not None:
        resumed[resumed_from[0]] = resumed_from[1]
    if start:
        tor.resumed_at(start, None if step_seconds is None else start * step_seconds)
    waiting: list[tuple[int, bool, tuple[str, ...]]] = []  # (step, pinned, durable reasons)
    running: list = []  # [step, finish step, durable reasons, duration] while an upload runs
    started = 0

    def prune(tier: str) -> None:
        kept = run.local if tier == "local" else run.durable
        if not kept:
            return
        mask = oracle_retain(lret if tier == "local" else dret, kept)
        guard = {kept[-1].step, resumed[tier]}
        if tier == "local":
            guard |= {w[0] for w in waiting} | set(running[:1])  # the running upload's step
        survivors = []
        for c, keep in zip(kept, mask):
            if keep or c.step in guard:
                survivors.append(c)
            else:
                run.events.append(("delete", tier, c.step))
        kept[:] = survivors

    def commit(tier: str, checkpoint: Checkpoint) -> None:
        (run.local if tier == "local" else run.durable).append(checkpoint)
        if resumed[tier] != checkpoint.step:
            resumed[tier] = None

    def begin(now: int) -> None:
        nonlocal started
        if running or not waiting:
            return
        step, _, reasons = waiting.pop(0)
        d = durations[started % len(durations)]
        started += 1
        running[:] = [step, now + d, reasons, d]
        run.events.append(("upload", step))

    def end(now: int) -> None:
        step, _, reasons, d = running
        running.clear()
        source = next(c for c in run.local if c.step == step)
        commit("durable", Checkpoint(step, source.time, source.metrics, step == total and "final" in reasons))
        run.events.append(("durable", step))
        prune("durable")
        prune("local")
        if save_seconds is not None and step_seconds is not None:
            tor.note_upload_cost(d * step_seconds)
        begin(now)

    for step in range(start + 1, total + 1):
        while running and running[1] <= step:
            end(step)
        reported = metrics(step) if metrics is not None else None
        p = progress_at(step, total, steps_per_epoch, step_seconds, reported)
        if step == signal_at:
            p = p.replace(signal="SIGTERM")
        save, lreasons, dreasons = tor.decide(p)
        if not save:
            continue
        # promoted: a durable save, or a local signal save (the job is about to end), which the
        # durable tier's rules then count from
        promote = dreasons or tuple(r for r in lreasons if r.startswith("on_signal"))
        if promote and not dreasons:
            tor.note_save(step, p.time, ("durable",))
        run.events.append(("save", step, lreasons, dreasons, promote))
        commit("local", Checkpoint(step, p.time, reported, step == total and "final" in lreasons + dreasons))
        if promote:
            pinned = "final" in promote or any(r.startswith("on_signal") for r in promote)
            if waiting and not waiting[-1][1]:
                run.events.append(("replaced", waiting.pop()[0], step))
            waiting.append((step, pinned, promote))
        prune("local")
        if save_seconds is not None:
            tor.note_cost(save_seconds)
        begin(step)
    while running:  # close: the promoter drains
        end(total)
    prune("local")
    prune("durable")
    return run

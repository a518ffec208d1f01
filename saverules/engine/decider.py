"""The save decision for one run: a compiled policy plus the little state it needs.

A :class:`Decider` is called once per optimizer step with a
:class:`~saverules.engine.progress.Progress` and returns a
:class:`~saverules.engine.progress.Decision`.  Almost every call takes the *quiet*
path: no event on the Progress, the step below the next step at which any rule
could fire, the clock below the next time threshold.  That check is generated
per policy (only the fields the policy's rules can react to are tested) and
costs a few attribute reads.  Everything else goes through :meth:`_decide`,
which evaluates the rules that can fire at this step and explains the result.

A decision costs as much as the rules it has to look at, not the whole
policy: each top-level rule is kept in a heap under the lowest step at which it
can fire (or change its state) while the run is quiet, and in a list for each
event it reacts to (signal, epoch end, metrics, the loop's ``is_last``, the
clock), as its nodes declare them (``Node.events``, see :mod:`saverules.engine.compile`).  A decision evaluates the rules whose step has come and the rules that
react to an event this Progress carries; the others cannot fire, and a skipped
rule holds no state that the decision would change.  The bounds only grow as
the run goes on (see :mod:`saverules.engine.compile`), so a bound computed at an
earlier decision is still a bound.  The one bound that may move earlier is an
``adaptive`` rule's interval, planned from the measured save cost: reporting a
cost (:meth:`Decider.note_cost`) recomputes every bound.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from heapq import heapify, heappop, heappush

from .compile import CLOCK, EPOCH_END, EVENTS, INF, LAST, METRICS, SIGNAL, ResolveError, compile_rules, policy_events
from .cost import COST_WINDOW, check_cost, estimate
from .errors import Diagnostic, PolicyError, dotted
from .progress import NO_SAVE, Decision, Progress, checked_total
from .rules import RuleModel, describe

#: Version 2 keys each rule's state by what the rule is (its canonical form),
#: version 1 by its position in the policy.
STATE_VERSION = 2
_READS = (1, 2)


class Decider:
    """Stateful save decisions for one run of a :class:`~saverules.engine.policy.Policy`."""

    def __new__(cls, policy, total_steps: int | None = None, *, where: tuple = ()):
        if cls is Decider:
            cls = _specialised(policy_events(policy))
        return object.__new__(cls)

    def __init__(self, policy, total_steps: int | None = None, *, where: tuple = ()):
        self.policy = policy
        #: Where this policy's rules sit in the document it came from: () for the top level,
        #: ("durable",) for the durable tier's view (errors then name "durable.rules[0]...").
        self._where = tuple(where)
        self._prev = 0  # the previously decided step
        self._last_save_step: int | None = None
        self._last_save_time: float | None = None  # or the clock at the first decision
        self._time = -math.inf  # the latest Progress.time a decision saw (the clock never goes back)
        self._next_step = 0  # until the rules are compiled: every call takes the full path
        self._next_time = -math.inf
        self._total: int | None = None
        self._compiled = None
        self._unresolved: ResolveError | None = None
        self._sim = None  # the run's shape, when a simulation drives this decider
        self._costs: list = []  # the latest measured save costs [(stall, write)], oldest first
        self._cost: tuple[float, float] | None = None  # their estimate (see saverules.engine.cost.estimate), None before any
        self._agenda: _Agenda | None = None
        fallback = policy.run.total_steps if policy.run is not None else None
        total_steps = checked_total(total_steps, "total_steps")
        self._set_total(total_steps if total_steps is not None else fallback)

    # -- what the policy reacts to (for DDP sync and the trainer callbacks) ----
    # Set per policy on the specialised class (see _specialised); a subclass
    # made some other way is assumed to react to everything.
    reacts_to: frozenset[str] = frozenset(EVENTS)
    watches_last = watches_signals = watches_epochs = watches_time = watches_metrics = True

    @property
    def total_steps(self) -> int | None:
        return self._total

    @property
    def next_step(self) -> int:
        """No rule can fire before this step while the run is quiet."""
        return self._next_step

    @property
    def next_time(self) -> float:
        """No clock rule can fire while Progress.time is below this."""
        return self._next_time

    # -- deciding -------------------------------------------------------------
    def __call__(self, progress) -> Decision:  # replaced by a specialised version
        return self._decide(progress)

    def _decide(self, p) -> Decision:
        if type(p) is not Progress:
            p = _as_progress(p)
        step = p.step
        if step < self._prev:
            raise ValueError(_backwards_message(step, self._prev))
        time = p.time
        if time is not None and time < self._time:
            raise ValueError(_clock_backwards_message(time, self._time, step))
        total = p.total_steps
        retotalled = total is not None and total != self._total
        if retotalled:
            self._set_total(total)
        if self._compiled is None:
            assert self._unresolved is not None  # set whenever compiling failed
            raise self._policy_error(self._unresolved)
        if self._last_save_time is None and p.time is not None:
            self._last_save_time = p.time  # clock rules count from the first decision
        agenda = self._agenda
        compiled = self._compiled
        # A new total moves every rule's bounds, even for this very step: all are evaluated.
        due = range(len(compiled)) if retotalled else agenda.due(p, self)
        # a reason is a string, or (for a rule that plans with the save cost) written now
        reasons = [
            name if name.__class__ is str else name(self)
            for node, name in (compiled[i] for i in due) if node.fires(p, self)
        ]
        save = bool(reasons) and step != self._last_save_step
        self._prev = step
        if time is not None:
            self._time = time
        if save:
            self._last_save_step = step
            if p.time is not None:
                self._last_save_time = p.time
        agenda.rekey(due, step, self)
        self._next_step = agenda.next_step()
        self._next_time = agenda.next_time(self._last_save_time)
        return Decision(True, tuple(dict.fromkeys(reasons))) if save else NO_SAVE

    def note_save(self, step: int, time: float | None = None) -> None:
        """Record a save made outside this decider's decisions (a forced save)."""
        self._last_save_step = step
        if time is not None:
            self._last_save_time = time
        self._refresh()

    def note_cost(self, stall_seconds: float, write_seconds: float | None = None) -> None:
        """Report what the latest save cost: ``stall_seconds`` of training-thread stall
        (the whole save when synchronous, the snapshot when asynchronous) and the
        ``write_seconds`` of wall time the whole write took (the stall, when omitted).

        The ``adaptive`` rule plans its interval from the mean of the last
        three reports.  The Checkpointer reports every save it makes.
        """
        self._costs = (self._costs + [check_cost(stall_seconds, write_seconds)])[-COST_WINDOW:]
        self._cost = estimate(self._costs)
        self._refresh()

    @property
    def save_cost(self):
        """The estimated (stall, write) seconds of a save, or None before any report."""
        return self._cost

    # -- internals --------------------------------------------------------------
    def _set_total(self, total: int | None) -> None:
        old = self._node_states() if self._compiled is not None else None
        try:
            self._compiled = compile_rules(self.policy, total)
            self._unresolved = None
        except ResolveError as exc:
            if total is not None:
                raise self._policy_error(exc) from None
            self._compiled, self._unresolved = None, exc
            return
        finally:
            self._total = total
        if old is not None:
            self._load_node_states(old, by_position=False)
        self._refresh()

    def _refresh(self) -> None:
        """Recompute every rule's bound from the previous decision (after a change of state)."""
        if self._compiled is None:
            return
        self._agenda = _Agenda(self._compiled, self, per_step=self._sim is not None)
        self._next_step = self._agenda.next_step()
        self._next_time = self._agenda.next_time(self._last_save_time)

    def _simulate(self, shape) -> None:
        """Let a simulation of a run of this ``shape`` drive this decider, asking it at
        every step it does not skip (see :meth:`_skip_to`)."""
        self._sim = shape
        self._refresh()

    def _next_fire(self) -> int:
        """Lowest step after the previous decision at which a step rule can fire,
        for a run asked at every step from here on (the simulator's jump target)."""
        if self._compiled is None:
            return INF
        return self._agenda.next_step()

    def _skip_to(self, step: int) -> None:
        """Record that every step up to ``step`` was decided and nothing was saved.

        Only for steps below :meth:`_next_fire` with the run quiet, where a
        per-step run takes the quiet path at each of them.
        """
        if step > self._prev:
            self._prev = step

    def _policy_error(self, exc: ResolveError) -> PolicyError:
        path = self._where + tuple(exc.path)
        line, col = self.policy.position(path) or (1, 1)
        return PolicyError([Diagnostic(self.policy.source, line, col, f"{dotted(path)}: {exc}")])

    # -- resume -------------------------------------------------------------------
    def state_dict(self) -> dict:
        """JSON-serialisable state; restoring it continues the run's decisions exactly."""
        return {
            "version": STATE_VERSION,
            "policy": self.policy.digest,
            "prev_step": self._prev,
            "last_save_step": self._last_save_step,
            "last_save_time": self._last_save_time,
            "total_steps": self._total,
            "rules": self._node_states() if self._compiled else {},
            "costs": [list(c) for c in self._costs],
        }

    def _node_states(self) -> dict:
        assert self._compiled is not None
        states = {}
        for (_, keys), nodes in zip(self._rule_keys(), _stateful_by_rule(self._compiled)):
            for key, node in zip(keys, nodes):
                states[key] = node.state()
        return states

    def fresh_state(self, step: int, time: float | None = None) -> dict:
        """The state of this policy's decider that has just saved ``step`` and holds no rule state."""
        return {"version": STATE_VERSION, "policy": self.policy.digest, "prev_step": step, "last_save_step": step,
                "last_save_time": time, "total_steps": None, "rules": {}, "costs": []}

    def load_state_dict(self, state: dict) -> Resumed:
        """Continue from ``state``; what it returns says which rules kept their state.

        A rule's state is matched by what the rule is (its kind and parameters,
        :func:`rule_identity`), never by its position: under a changed policy,
        the rules both policies hold keep their state and every other rule
        starts fresh from the saved step, as a new decider would.

        A two-tier decider's state (:class:`~saverules.engine.tiers.TieredDecider`,
        written under a policy with ``[durable]``) continues this decider from
        its local tier; the durable tier's state is dropped, and what is
        returned says so.
        """
        from .tiers import is_tiered_state

        if is_tiered_state(state):
            local = self.load_state_dict(state["local"])
            return replace(local, dropped_durable=True)
        if not isinstance(state, dict) or state.get("version") not in _READS:
            found = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"decider state has version {found!r}; this saverules reads versions 1 and 2")
        prev = int(state["prev_step"])
        last = state.get("last_save_step")
        t = state.get("last_save_time")
        rules = state.get("rules") or {}
        if not isinstance(rules, dict):
            raise ValueError(f"decider state 'rules' must be a table, got {type(rules).__name__}")
        costs = [check_cost(*c) for c in state.get("costs") or ()][-COST_WINDOW:]
        saved_digest = state.get("policy")
        same_policy = saved_digest == self.policy.digest
        if state["version"] == 1 and not same_policy:
            rules = {}  # positions of another policy say nothing about this one's rules
        self._prev = prev
        self._last_save_step = None if last is None else int(last)
        self._last_save_time = None if t is None else float(t)
        total = state.get("total_steps")
        if total is not None and int(total) != self._total:
            # the run's length is part of what is restored; a Progress that
            # carries another total changes it again at the next decision
            self._set_total(int(total))
        kept, fresh = self._load_node_states(rules, by_position=state["version"] == 1)
        self._costs = costs
        self._cost = estimate(self._costs)
        self._refresh()
        return Resumed(policy_changed=saved_digest is not None and not same_policy, kept=kept, fresh=fresh)

    def _load_node_states(self, states: dict, by_position: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
        kept: list[str] = []
        fresh: list[str] = []
        if not self._compiled:
            return (), ()
        for (name, node_keys), nodes in zip(self._rule_keys(by_position), _stateful_by_rule(self._compiled)):
            if not nodes:
                continue  # a rule without state decides the same either way
            found = [(states[key], node) for key, node in zip(node_keys, nodes) if key in states]
            if len(found) == len(nodes):
                for saved, node in found:
                    node.load(saved)
                kept.append(name)
            else:
                fresh.append(name)  # a new node's state is already fresh
        return tuple(kept), tuple(fresh)

    def _rule_keys(self, by_position: bool = False) -> list[tuple[str, list[str]]]:
        """(name, the state key of each stateful node) for each compiled top-level rule, in order."""
        out: list[tuple[str, list[str]]] = []
        seen: dict[str, int] = {}
        assert self._compiled is not None
        tops: list[RuleModel | None] = [None] * (len(self._compiled) - len(self.policy.rules))
        tops += list(self.policy.rules)
        for index, ((node, _), rule) in enumerate(zip(self._compiled, tops)):
            if by_position:
                base = str(index)
            else:
                ident = "final" if rule is None else rule_identity(rule)
                seen[ident] = seen.get(ident, 0) + 1
                base = ident if seen[ident] == 1 else f"{ident}#{seen[ident]}"
            keys = [f"{base}.{sub_index}" for sub_index, sub in enumerate(node.walk()) if hasattr(sub, "state")]
            out.append(("final" if rule is None else describe(rule), keys))
        return out


def rule_identity(rule: RuleModel) -> str:
    """What a rule is, as a short stable key: equal exactly for rules of the same kind and parameters."""
    canonical = f"{type(rule).__name__}:{rule.model_dump_json()}"
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Resumed:
    """What :meth:`Decider.load_state_dict` did with the saved rule states.

    ``kept`` names the rules whose state continued (the same rule is in both
    policies), ``fresh`` the rules with state that started fresh (new or
    changed rules); rules without state are in neither.
    """

    policy_changed: bool
    kept: tuple[str, ...] = ()
    fresh: tuple[str, ...] = ()
    #: The state was a two-tier decider's and this policy has no ``[durable]`` table: the
    #: local tier's state continued here and the durable tier's was dropped.
    dropped_durable: bool = False

    def message(self, where: str, step: int) -> str | None:
        """The one warning to show the user, or None when the policy did not change."""
        if self.dropped_durable:
            return (
                f"saverules: {where} (step {step}) was written under a policy with a durable tier ([durable]) and "
                "this policy has none: the durable tier's decider state is dropped (its checkpoints stay where "
                f"they are), and the local tier continues: {self.rules_text(step)}"
            )
        if not self.policy_changed:
            return None
        return f"saverules: {where} (step {step}) was written under a different policy. {self.rules_text(step)}"

    def rules_text(self, step: int) -> str:
        """What happened to each rule's decider state, as sentences for a warning."""
        if not self.policy_changed:
            return "its rules are the same and keep their decider state"
        kept = ", ".join(self.kept) or "none"
        fresh = ", ".join(self.fresh) or "none had any to drop"
        return (
            "Rules are matched by what "
            f"they are, not by their position: rules in both policies keep their decider state (kept: {kept}); "
            f"changed and new rules start fresh from step {step} (fresh: {fresh}; a rule without state decides "
            "the same either way). The new policy applies from here on, retention included"
        )


def _as_progress(p) -> Progress:
    """A checked Progress for ``p`` (a Progress subclass, or an object with the same fields)."""
    if isinstance(p, Progress):
        return p
    try:
        fields = {name: getattr(p, name) for name in ("step", "total_steps", "epoch", "epoch_end", "is_last",
                                                      "time", "metrics", "signal") if hasattr(p, name)}
        return Progress(**fields)
    except TypeError as exc:
        if "step" not in fields:
            raise TypeError(
                f"a decider is called with a saverules.Progress, got {type(p).__name__}"
            ) from None
        raise exc from None


def _backwards_message(step: int, prev: int) -> str:
    return (
        f"Progress.step went backwards: step {step} after step {prev}. Steps count completed optimizer steps and "
        f"never decrease (a repeat of step {prev} is allowed). To continue a run from a checkpoint, restore the "
        "decider's state with the checkpoint (Checkpointer.load_latest does, or Decider.load_state_dict) and go on "
        f"from the saved step + 1; to start the run over, build a new decider with policy.compile()"
    )


def _clock_backwards_message(time: float, latest: float, step: int) -> str:
    return (
        f"Progress.time went backwards: {time!r} s at step {step} after {latest!r} s. The training clock never "
        "decreases (a repeat of the same time is allowed); a wall clock that jumps (NTP, a suspended machine) "
        "would make clock rules fire early or never. Use a monotonic clock that continues across resumes, such "
        "as Checkpointer.clock() (time.monotonic() counted from the run's start)"
    )


def _stateful_by_rule(compiled) -> list[list]:
    """For each compiled top-level rule, its nodes that hold state, in walk order."""
    return [[sub for sub in node.walk() if hasattr(sub, "state")] for node, _ in compiled]


# -- which rules a decision looks at ------------------------------------------------


class _Agenda:
    """The top-level rules by the step from which each can fire and the events each reacts to.

    With ``per_step`` (a simulation, which asks at every step it does not skip)
    the bound is :meth:`~saverules.engine.compile.Node.next_fire`, otherwise
    :meth:`~saverules.engine.compile.Node.next_step`; either way joined with
    :meth:`~saverules.engine.compile.Node.next_change`.
    """

    def __init__(self, compiled, run, per_step: bool):
        self.nodes = [node for node, _ in compiled]
        self.per_step = per_step
        # the rules that react to each event a Progress may carry, as their nodes declare
        reacting: dict[str, list[int]] = {event: [] for event in _HAPPENED}
        timed = []
        for i, node in enumerate(self.nodes):
            events = node.reacts_to()
            for event in events & _HAPPENED.keys():
                reacting[event].append(i)
            if CLOCK in events:
                # a rule's clock threshold is the anchor plus its shortest interval;
                # an adaptive rule's interval is the one planned from the current cost
                # estimate, so the agenda is rebuilt when a cost is reported (note_cost)
                offset = min(n.clock_offset(run) for n in node.walk() if CLOCK in n.events)
                if offset < math.inf:  # an adaptive rule a simulation without a cost leaves out
                    timed.append((offset, i))
        self.reacting = [(_HAPPENED[event], indices) for event, indices in reacting.items() if indices]
        timed.sort()
        self.time_offsets = [offset for offset, _ in timed]
        self.timed = [i for _, i in timed]
        after = run._prev
        self.keys = [self._key(node, after, run) for node in self.nodes]
        self.versions = [0] * len(self.nodes)
        self.heap = [(key, 0, i) for i, key in enumerate(self.keys) if key < INF]
        heapify(self.heap)

    def _key(self, node, after, run) -> int:
        bound = node.next_fire(after, run) if self.per_step else node.next_step(after, run)
        return min(bound, node.next_change(after, run))

    def due(self, p, run) -> list:
        """Indices, in order, of the rules that may fire or change at this decision."""
        step = p.step
        heap, versions = self.heap, self.versions
        due = set()
        while heap and heap[0][0] <= step:
            _, version, i = heappop(heap)
            if version == versions[i]:
                due.add(i)
        for happened, indices in self.reacting:
            if happened(p):
                due.update(indices)
        anchor = run._last_save_time
        if self.timed and p.time is not None and anchor is not None:
            offsets = self.time_offsets
            # EveryTime and Adaptive fire at p.time >= anchor + offset (computed as they do)
            n = 0
            while n < len(offsets) and p.time >= anchor + offsets[n]:
                n += 1
            due.update(self.timed[:n])
        return sorted(due)

    def rekey(self, indices, after: int, run) -> None:
        """New bounds for the rules just evaluated, from the step just decided."""
        heap, versions, keys, nodes = self.heap, self.versions, self.keys, self.nodes
        for i in indices:
            key = self._key(nodes[i], after, run)
            keys[i] = key
            versions[i] += 1
            if key < INF:
                heappush(heap, (key, versions[i], i))
        if len(heap) > 4 * len(nodes) + 64:  # drop entries that newer bounds replaced
            self.heap = [(k, versions[i], i) for i, k in enumerate(keys) if k < INF]
            heapify(self.heap)

    def next_step(self) -> int:
        heap, versions = self.heap, self.versions
        while heap and heap[0][1] != versions[heap[0][2]]:
            heappop(heap)
        return heap[0][0] if heap else INF

    def next_time(self, anchor) -> float:
        if not self.timed:
            return math.inf
        return -math.inf if anchor is None else anchor + self.time_offsets[0]


#: event -> does this Progress carry it (the clock is compared with each rule's threshold instead)
_HAPPENED = {
    LAST: lambda p: p.is_last is True,
    SIGNAL: lambda p: bool(p.signal),
    EPOCH_END: lambda p: p.epoch_end,
    METRICS: lambda p: bool(p.metrics),
}

# -- the generated quiet path ---------------------------------------------------

#: event -> the quiet path's test that a Progress does not carry it (reads the slots directly)
_QUIET = {
    LAST: "p._is_last is not True",
    SIGNAL: "not p._signal",
    EPOCH_END: "not p._epoch_end",
    METRICS: "not p._metrics",
    CLOCK: "(p._time is None or self._time <= p._time < self._next_time)",
}
assert set(_QUIET) == set(EVENTS) and set(_HAPPENED) == set(EVENTS) - {CLOCK}, "an event without its test"

_CLASSES: dict = {}


def _specialised(events: frozenset) -> type:
    """A Decider subclass whose __call__ tests only the events this policy reacts to."""
    cls = _CLASSES.get(events)
    if cls is not None:
        return cls
    # A Progress is checked when it is built, so on the quiet path the step is
    # an int >= 1; what is left to test is its order.  The fields are read
    # from the Progress's slots directly, the cheapest read there is.
    checks = ["type(p) is Progress", "self._prev <= p._step < self._next_step"]
    checks += [_QUIET[event] for event in EVENTS if event in events]
    if CLOCK not in events:
        # the clock never goes back: a time below the latest one takes the full path, which refuses it
        checks.append("(p._time is None or self._time <= p._time)")
    checks.append("(p._total_steps == self._total or p._total_steps is None)")
    source = (
        "def __call__(self, p):\n"
        f"    if {' and '.join(checks)}:\n"
        "        self._prev = p._step\n"
        "        if p._time is not None:\n"
        "            self._time = p._time\n"
        "        return NO_SAVE\n"
        "    return self._decide(p)\n"
    )
    namespace = {"NO_SAVE": NO_SAVE, "Progress": Progress}
    exec(compile(source, f"<saverules quiet path {sorted(events)}>", "exec"), namespace)
    attributes = {
        "__call__": namespace["__call__"], "__module__": __name__, "_quiet_source": source, "reacts_to": events,
        "watches_last": LAST in events, "watches_signals": SIGNAL in events, "watches_epochs": EPOCH_END in events,
        "watches_time": CLOCK in events, "watches_metrics": METRICS in events,
    }
    cls = type("Decider", (Decider,), attributes)
    _CLASSES[events] = cls
    return cls

"""Properties of the two-tier runtime's engine side, against the naive oracle (tests/helpers/oracle.py).

* The runtime :class:`~saverules.engine.tiers.TieredDecider`, asked step by step,
  saves in each tier exactly what :func:`~saverules.engine.tiers.simulate_tiers`
  simulates and what the naive two-tier oracle decides, reasons included; so it
  does on irregular runs (jumps, clocks, signals, metrics, forced saves), and
  after a resume from its state at any step.
* The run of both tiers, composed from the library's pure parts as the store
  composes them (TieredDecider, :class:`~saverules.engine.tiers.PromotionQueue`,
  :class:`~saverules.engine.tiers.Protected`, each tier's ``Policy.retain``),
  with uploads that end at arbitrary later steps, equals the oracle's model of
  it event by event; the protected set is never deleted; once the queue drains
  each tier keeps exactly its retention of what it committed; and the final
  step always reaches the durable tier.
"""
from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from oracle import TieredOracle, TierRun, oracle_retain, oracle_tier_run, oracle_tiers
from strategies import metric_functions, progress_sequences, two_tier_docs

from saverules import Checkpoint, Policy
from saverules.engine.simulate import progress_at
from saverules.engine.tiers import (
    PromotionQueue,
    Protected,
    TieredDecider,
    durable_policy,
    local_policy,
    must_reach_durable,
    promoted,
    simulate_tiers,
)

totals = st.integers(1, 150)  # long enough for every rule to fire and retention to drop; short for CI
epochs = st.none() | st.integers(1, 50)
seconds = st.none() | st.sampled_from([0.4, 1.0, 3.0])


def per_tier(decider, total, spe, secs, metrics, start=0, stop=None):
    """Ask ``decider`` at every step start+1..stop (total); each tier's saves [(step, reasons)]."""
    local, durable = [], []
    for step in range(start + 1, (total if stop is None else stop) + 1):
        d = decider(progress_at(step, total, spe, secs, metrics(step) if metrics else None))
        if d.reasons:
            local.append((step, d.reasons))
        if d.durable:
            durable.append((step, d.durable))
        assert d.save == bool(d.reasons or d.durable)
        assert d.tiers == (("local", "durable") if d.durable else ("local",) if d.save else ())
    return local, durable


# -- the decisions -------------------------------------------------------------------------------------


@given(two_tier_docs(), totals, epochs, seconds, metric_functions())
def test_the_runtime_saves_in_each_tier_what_simulate_tiers_and_the_oracle_say(doc, total, spe, secs, metrics):
    policy = Policy.model_validate(doc)
    decider = policy.compile(total)
    assert isinstance(decider, TieredDecider)
    local, durable = per_tier(decider, total, spe, secs, metrics)
    sim = simulate_tiers(policy, total, spe, secs, metrics, max_saves=None)
    assert local == sim.local.saves
    assert durable == sim.durable.saves
    ref = oracle_tiers(doc, total, spe, secs, metrics)
    assert [s for s, _ in durable] == ref.durable_saves
    assert sorted({s for s, _ in local} | {s for s, _ in durable}) == ref.local_saves == [s for s, _ in sim.local_saves]


@given(st.data(), two_tier_docs(max_rules=3), st.none() | st.integers(1, 150))
def test_on_irregular_runs_each_tier_decides_as_the_naive_oracle(data, doc, total):
    policy = Policy.model_validate(doc)
    items = data.draw(progress_sequences(total, max_len=25))
    decider, oracle = policy.compile(total), TieredOracle(doc, total)
    for item in items:
        if isinstance(item, tuple):  # a save the loop made itself, in one tier or both
            tiers = data.draw(st.sampled_from([("local",), ("durable",), ("local", "durable")]))
            decider.note_save(item[1], item[2], tiers)
            oracle.note_save(item[1], item[2], tiers)
            continue
        try:
            got = decider(item)
        except ValueError as exc:  # a refused Progress (a share with no total, a clock gone back)
            try:
                oracle.decide(item)
            except Exception:
                continue
            raise AssertionError(f"the decider refused {item} and the oracle did not: {exc}") from exc
        assert tuple(got) == oracle.decide(item), item


@given(two_tier_docs(), totals, epochs, seconds, metric_functions(), st.data())
def test_a_resume_from_the_state_at_any_step_continues_each_tier_exactly(doc, total, spe, secs, metrics, data):
    policy = Policy.model_validate(doc)
    whole = per_tier(policy.compile(total), total, spe, secs, metrics)
    cut = data.draw(st.integers(0, total))
    first = policy.compile(total)
    head = per_tier(first, total, spe, secs, metrics, stop=cut)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = policy.compile(total)
    said = resumed.load_state_dict(state)
    assert not said.policy_changed and said.message("c", cut) is None
    tail = per_tier(resumed, total, spe, secs, metrics, start=cut)
    assert (head[0] + tail[0], head[1] + tail[1]) == whole


# -- the run of both tiers: promotions, the upload queue, the protected set -----------------------------


def runtime_tier_run(policy: Policy, total, spe=None, secs=None, metrics=None, *, signal_at=None, durations=(1,),
                     start=0, initial_local=(), initial_durable=(), resumed_from=None,
                     save_seconds=None) -> TierRun:
    """A run of both tiers made of the library's pure parts, as the store makes it (see oracle_tier_run
    for the model it must equal).  After every event it checks, from what happened rather than from
    :class:`Protected`, that nothing protected is gone."""
    decider = policy.compile(total)
    if start:
        decider.load_state_dict(decider.fresh_state(start, None if secs is None else start * secs))
    retain = {"local": local_policy(policy).retain, "durable": durable_policy(policy).retain}
    run = TierRun()
    run.local, run.durable = list(initial_local), list(initial_durable)
    tiers = {"local": run.local, "durable": run.durable}
    protect = {tier: Protected(kept[-1].step if kept else None) for tier, kept in tiers.items()}
    if resumed_from is not None:
        protect[resumed_from[0]].resumed_from = resumed_from[1]
    queue: PromotionQueue[int] = PromotionQueue()
    finals: dict[int, bool] = {}  # step -> the durable tier's final fired for it
    running: list = []  # [finish step, duration]
    count = 0
    # what the checks below follow, independently of Protected
    newest = {tier: (kept[-1].step if kept else None) for tier, kept in tiers.items()}
    from_resume = dict([resumed_from]) if resumed_from is not None else {}

    def check() -> None:
        for tier, kept in tiers.items():
            steps = {c.step for c in kept}
            assert newest[tier] is None or newest[tier] in steps, f"the newest {tier} checkpoint was deleted"
            if tier in from_resume:
                assert from_resume[tier] in steps, f"the {tier} checkpoint a resume came from was deleted"
        held = queue.pending() - {c.step for c in run.local}
        assert not held, f"local checkpoints {sorted(held)} were deleted while their promotion was pending"

    def committed(tier: str, checkpoint: Checkpoint) -> None:
        tiers[tier].append(checkpoint)
        protect[tier].committed(checkpoint.step)
        newest[tier] = checkpoint.step
        if from_resume.get(tier, checkpoint.step) != checkpoint.step:
            del from_resume[tier]  # a newer one is committed in that tier

    def prune(tier: str) -> None:
        kept = tiers[tier]
        if not kept:
            return
        mask = protect[tier].keep([c.step for c in kept], retain[tier](kept))
        for c, keep in zip(list(kept), mask):
            if not keep:
                kept.remove(c)
                run.events.append(("delete", tier, c.step))
        check()

    def begin(now: int) -> None:
        nonlocal count
        step = queue.start()
        if step is None:
            return
        d = durations[count % len(durations)]
        count += 1
        running[:] = [now + d, d]
        run.events.append(("upload", step))

    def end(now: int) -> None:
        step = queue.finish()
        d = running[1]
        running.clear()
        source = next(c for c in run.local if c.step == step)
        committed("durable", Checkpoint(step, source.time, source.metrics, step == total and finals[step]))
        run.events.append(("durable", step))
        prune("durable")
        protect["local"].release(step)
        prune("local")
        if save_seconds is not None and secs is not None:
            decider.note_upload_cost(d * secs)
        begin(now)

    for step in range(start + 1, total + 1):
        while running and running[0] <= step:
            end(step)
        reported = metrics(step) if metrics is not None else None
        p = progress_at(step, total, spe, secs, reported)
        if step == signal_at:
            p = p.replace(signal="SIGTERM")
        decision = decider(p)
        if not decision:
            continue
        reasons = promoted(decision)
        if reasons and not decision.durable:  # a local signal save, promoted: the durable tier's rules count from it
            decider.note_save(step, p.time, ("durable",))
        run.events.append(("save", step, decision.reasons, decision.durable, reasons))
        final = step == total and "final" in decision.reasons + decision.durable
        committed("local", Checkpoint(step, p.time, reported, final))
        if reasons:
            finals[step] = "final" in reasons
            replaced = queue.offer(step, must_reach_durable(reasons))
            protect["local"].hold(step)
            if replaced is not None:
                protect["local"].release(replaced)
                run.events.append(("replaced", replaced, step))
        prune("local")
        if save_seconds is not None:
            decider.note_cost(save_seconds)
        begin(step)
    while running:  # close: drain the queue, then each tier's retention once more
        end(total)
    assert len(queue) == 0 and queue.pending() == frozenset()
    prune("local")
    prune("durable")
    return run


def retained(retention, checkpoints, start=()):
    """The oracle's retention after each of ``checkpoints`` is committed, from ``start``."""
    kept = list(start)
    for c in checkpoints:
        kept.append(c)
        kept = [k for k, keep in zip(kept, oracle_retain(retention, kept)) if keep]
    return kept


@st.composite
def tier_runs(draw):
    """A two-tier run: the policy, the run's shape, when the loop is signalled, how long each upload
    takes, and sometimes a resume (tiers holding what an earlier part of the run kept)."""
    doc = draw(two_tier_docs())
    total = draw(st.integers(1, 120))
    spe, secs, metrics = draw(epochs), draw(seconds), draw(metric_functions())
    signal_at = draw(st.none() | st.integers(1, total))
    if signal_at is not None:  # a preemption the policy acts on, in either tier or both
        tiers = draw(st.sampled_from([(), ("local",), ("durable",), ("local", "durable")]))
        if "local" in tiers:
            doc["rules"] = [*doc["rules"], {"kind": "on_signal"}]
        if "durable" in tiers:
            doc["durable"] = {**doc["durable"], "rules": [*doc["durable"]["rules"], {"kind": "on_signal"}]}
    durations = tuple(draw(st.lists(st.integers(1, 12) | st.integers(1, total), min_size=1, max_size=6)))
    start = draw(st.integers(0, total - 1)) if draw(st.booleans()) else 0
    policy = Policy.model_validate(doc)

    def earlier(retention):
        steps = sorted(draw(st.sets(st.integers(1, start), max_size=6))) if start else []
        made = [Checkpoint(s, None if secs is None else s * secs, metrics(s) if metrics else None) for s in steps]
        return retained(retention, made)

    initial_local = earlier(local_policy(policy).retention)
    initial_durable = earlier(durable_policy(policy).retention)
    resumed_from = None
    choices = [("local", c.step) for c in initial_local] + [("durable", c.step) for c in initial_durable]
    if choices and draw(st.booleans()):
        resumed_from = draw(st.sampled_from(choices))
    save_seconds = draw(st.none() | st.sampled_from([0.1, 2.0]))
    return doc, total, spe, secs, metrics, dict(
        signal_at=signal_at, durations=durations, start=start, initial_local=initial_local,
        initial_durable=initial_durable, resumed_from=resumed_from, save_seconds=save_seconds)


@given(tier_runs())
def test_the_run_of_both_tiers_equals_the_model_and_never_deletes_what_is_protected(case):
    doc, total, spe, secs, metrics, options = case
    policy = Policy.model_validate(doc)
    got = runtime_tier_run(policy, total, spe, secs, metrics, **options)  # checks the protected set as it goes
    want = oracle_tier_run(doc, total, spe, secs, metrics, **options)
    assert got.events == want.events
    assert got.local_kept == want.local_kept and got.durable_kept == want.durable_kept


@given(tier_runs())
def test_once_the_queue_drains_each_tier_keeps_its_retention_and_the_final_step_is_durable(case):
    doc, total, spe, secs, metrics, options = case
    policy = Policy.model_validate(doc)
    run = runtime_tier_run(policy, total, spe, secs, metrics, **options)
    saved = [e for e in run.events if e[0] == "save"]

    def checkpoint(step, reasons):
        return Checkpoint(step, None if secs is None else step * secs, metrics(step) if metrics else None,
                          step == total and "final" in reasons)

    local = [checkpoint(s, lr + dr) for _, s, lr, dr, _ in saved]
    reasons = {s: why for _, s, _, _, why in saved}  # why each was promoted
    durable = [checkpoint(s, reasons[s]) for s in run.uploads]
    lret, dret = local_policy(policy).retention, durable_policy(policy).retention
    assert run.local_kept == [c.step for c in retained(lret, local, options["initial_local"])]
    assert run.durable_kept == [c.step for c in retained(dret, durable, options["initial_durable"])]
    assert run.uploads == sorted(set(run.uploads)), "uploads commit in step order, each once"
    if doc["durable"].get("final", True):
        assert run.uploads[-1] == total and total in run.durable_kept and total in run.local_kept
    # a promotion is only ever dropped for a newer one, never a final or a signal save's
    for _, old, new in (e for e in run.events if e[0] == "replaced"):
        assert old < new and "final" not in reasons[old] and not any(r.startswith("on_signal") for r in reasons[old])
    for _, _s, local_reasons, durable_reasons, why in saved:  # a signal save is promoted, whatever the durable rules say
        assert why == (durable_reasons or tuple(r for r in local_reasons if r.startswith("on_signal")))
    if not any(e[0] == "replaced" for e in run.events) and not options["start"]:
        # nothing was replaced: the durable tier committed every durable save, as simulate_tiers says
        sim = simulate_tiers(policy, total, spe, secs, metrics, max_saves=None)
        if options["signal_at"] is None and options["save_seconds"] is None:
            assert run.uploads == [s for s, _ in sim.durable.saves]
            assert run.durable_kept == sim.durable.kept and run.local_kept == sim.local_kept


# -- the pure parts on their own ------------------------------------------------------------------------


@given(st.lists(st.tuples(st.sampled_from(["offer", "start", "finish"]), st.booleans()), max_size=60))
def test_the_promotion_queue_runs_one_upload_and_waits_pinned_then_the_newest(ops):
    queue: PromotionQueue[int] = PromotionQueue()
    n = 0
    offered_pinned: set[int] = set()
    uploaded: list[int] = []
    for op, pinned in ops:
        before = queue.pending()
        if op == "offer":
            n += 1
            replaced = queue.offer(n, pinned)
            if pinned:
                offered_pinned.add(n)
            assert replaced is None or (replaced not in offered_pinned and replaced < n)
            assert queue.pending() == (before | {n}) - ({replaced} if replaced is not None else set())
        elif op == "start":
            was_running = queue.running
            item = queue.start()
            assert (item is None) == (was_running is not None or not before)
            assert queue.pending() == before
        elif queue.running is not None:
            item = queue.finish()
            uploaded.append(item)
            assert queue.pending() == before - {item}
        waiting = queue.waiting
        unpinned = [w for w in waiting if w not in offered_pinned]
        assert len(unpinned) <= 1 and (not unpinned or unpinned[0] == waiting[-1])
        assert waiting == tuple(sorted(waiting)) and len(queue) == len(queue.pending())
        assert set(queue.pinned_waiting()) == set(waiting) & offered_pinned
    assert uploaded == sorted(uploaded)
    assert offered_pinned <= set(uploaded) | queue.pending(), "a pinned promotion is never dropped"


@given(two_tier_docs(), totals, epochs, seconds, metric_functions(), st.data())
def test_a_resume_across_a_change_of_tiers_continues_the_local_tier_exactly(doc, total, spe, secs, metrics, data):
    two = Policy.model_validate(doc)
    one = Policy.model_validate({k: v for k, v in doc.items() if k != "durable"})
    cut = data.draw(st.integers(0, total))
    # tier added: a one-tier run's state into the policy with [durable]
    first = one.compile(total)
    head, _ = per_tier(first, total, spe, secs, metrics, stop=cut)
    added = two.compile(total)
    said = added.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert said.durable is None and "start fresh from step" in said.message("c", cut)
    local, durable = per_tier(added, total, spe, secs, metrics, start=cut)
    assert head + local == per_tier(one.compile(total), total, spe, secs, metrics)[0]
    fresh = TieredOracle(doc, total)  # the durable tier: as if it had just saved at the cut, with no rule state
    if cut:
        fresh.resumed_at(cut, first.state_dict()["last_save_time"])
    want = []
    for step in range(cut + 1, total + 1):
        _, _, dreasons = fresh.decide(progress_at(step, total, spe, secs, metrics(step) if metrics else None))
        if dreasons:
            want.append((step, dreasons))
    assert durable == want
    # tier removed: a two-tier run's state into the policy without [durable]
    both = two.compile(total)
    head, _ = per_tier(both, total, spe, secs, metrics, stop=cut)
    removed = one.compile(total)
    said = removed.load_state_dict(json.loads(json.dumps(both.state_dict())))
    assert said.dropped_durable and "decider state is dropped" in said.message("c", cut)
    local, durable = per_tier(removed, total, spe, secs, metrics, start=cut)
    assert durable == [] and head + local == per_tier(two.compile(total), total, spe, secs, metrics)[0]

"""The decider of two tiers (saverules.engine.tiers.TieredDecider) and the tiered Decision.

Examples worked by hand; the properties against the oracle are in
test_tier_properties.py.
"""
from __future__ import annotations

import dataclasses
import json
import warnings

import pytest

import saverules
from saverules import Decider, Decision, PolicyError, Progress
from saverules.distributed import SyncedDecider
from saverules.engine.progress import NO_SAVE
from saverules.engine.tiers import TieredDecider, TierResumed, is_tiered_state
from saverules.store.restore import restore_decider

LOCAL_ONLY = """version = 1
final = false
[[rules]]
kind = "every_steps"
every = 3
"""

TWO_TIERS = LOCAL_ONLY + """[durable]
dir = "memory://run"
final = false
[[durable.rules]]
kind = "every_steps"
every = 5
"""


def saves(decider, steps, **fields):
    out = []
    for s in steps:
        d = decider(Progress(s, **{k: (v(s) if callable(v) else v) for k, v in fields.items()}))
        if d:
            out.append((s, d.reasons, d.durable))
    return out


# -- Decision ------------------------------------------------------------------------------


def test_a_one_tier_decision_is_what_it_was():
    d = Decision(True, ("manual",))
    assert d == Decision(True, ("manual",), ()) and d.durable == () and d.tiers == ("local",) and d
    assert NO_SAVE == Decision(False) and NO_SAVE.tiers == () and not NO_SAVE
    assert Decision(True, (), ("every_steps(every=5)",)).tiers == ("local", "durable")
    assert Decision(True, ("a",), ("b",)) != Decision(True, ("a",))
    assert Decision(True, ("a",), ("b",))._replace(durable=()) == Decision(True, ("a",))


# -- compile and decide ---------------------------------------------------------------------------


def test_compile_gives_a_tiered_decider_only_for_a_policy_with_a_durable_table():
    assert isinstance(saverules.loads(TWO_TIERS).compile(), TieredDecider)
    one = saverules.loads(LOCAL_ONLY).compile()
    assert isinstance(one, Decider) and not isinstance(one, TieredDecider)
    with pytest.raises(ValueError, match=r"has no \[durable\] table.*Policy.compile\(\)"):
        TieredDecider(saverules.loads(LOCAL_ONLY, "one.toml"))


def test_each_tier_names_its_own_rules_and_a_durable_save_is_a_local_save():
    got = saves(saverules.loads(TWO_TIERS).compile(), range(1, 16))
    three, five = ("every_steps(every=3)",), ("every_steps(every=5)",)
    assert got == [(3, three, ()), (5, (), five), (6, three, ()), (9, three, ()), (10, (), five),
                   (12, three, ()), (15, three, five)]


def test_the_final_step_reaches_both_tiers_by_default():
    policy = saverules.loads(TWO_TIERS.replace("final = false\n", ""))
    d = policy.compile(7)
    last = [d(Progress(s, 7)) for s in range(1, 8)][-1]
    assert last == Decision(True, ("final",), ("final",)) and last.tiers == ("local", "durable")


def test_a_promotion_does_not_reset_the_local_tiers_clock():
    text = """version = 1
final = false
[[rules]]
kind = "every_time"
every = "10s"
[durable]
final = false
[[durable.rules]]
kind = "at_steps"
steps = [4]
"""
    got = saves(saverules.loads(text).compile(), range(1, 13), time=lambda s: 2.0 * s)
    # the clock starts at step 1 (2 s): the local tier saves at 12 s (step 6) and 22 s (step 11),
    # the durable save at step 4 (8 s) moves neither
    assert [(s, bool(r), bool(d)) for s, r, d in got] == [(4, False, True), (6, True, False), (11, True, False)]


def test_what_the_tiered_decider_reacts_to_is_both_tiers():
    text = LOCAL_ONLY + '[durable]\n[[durable.rules]]\nkind = "on_signal"\n'
    d = saverules.loads(text).compile()
    one = saverules.loads(LOCAL_ONLY).compile()
    assert d.watches_signals and not one.watches_signals
    assert d.reacts_to == type(d.local).reacts_to | type(d.durable).reacts_to and "signal" in d.reacts_to
    assert not d.watches_metrics and not d.watches_time
    d(Progress(1))
    assert d.next_step == min(d.local.next_step, d.durable.next_step) == 3
    assert saves(d, [2, 3], signal="SIGTERM")[-1] == (3, ("every_steps(every=3)",), ("on_signal",))


def test_a_share_in_a_durable_rule_without_a_total_names_the_durable_key():
    text = LOCAL_ONLY + '[durable]\n[[durable.rules]]\nkind = "every_steps"\nevery = "10%"\n'
    d = saverules.loads(text, "tiers.toml").compile()
    with pytest.raises(PolicyError, match=r"^tiers\.toml:9:1: error: durable\.rules\[0\]\.every: \"10%\" is a share"):
        d(Progress(1))


# -- what the store tells it -----------------------------------------------------------------------------


def test_note_save_reaches_the_tiers_it_names():
    text = """version = 1
final = false
[[rules]]
kind = "tail"
interval = 10
[durable]
final = false
[[durable.rules]]
kind = "tail"
interval = 10
"""
    policy = saverules.loads(text)
    both, local_only, durable_only = policy.compile(20), policy.compile(20), policy.compile(20)
    for d in (both, local_only, durable_only):
        d(Progress(12, 20))
    both.note_save(12)
    local_only.note_save(12, tiers=("local",))
    durable_only.note_save(12, None, "durable")
    # a tail rule saves midway between the last save and the end: 16 after a save at 12, 15 before any
    first = {name: saves(d, range(13, 21), total_steps=20)[0] for name, d in
             (("both", both), ("local", local_only), ("durable", durable_only))}
    assert first["both"][0] == 16 and first["both"][1] and first["both"][2]
    assert first["local"] == (15, (), ("tail(interval=10)",))
    assert first["durable"] == (15, ("tail(interval=10)",), ())
    with pytest.raises(ValueError, match=r"tiers must name 'local' and/or 'durable', got 'remote'"):
        both.note_save(20, tiers=("local", "remote"))


def test_the_save_cost_is_the_local_tiers_and_the_upload_time_the_durable_tiers():
    text = """version = 1
final = false
[[rules]]
kind = "adaptive"
max_overhead = "1%"
min_every = "1s"
[durable]
final = false
[[durable.rules]]
kind = "adaptive"
max_overhead = "10%"
min_every = "1s"
"""
    d = saverules.loads(text).compile()
    d.note_cost(0.5, 2.0)
    d.note_upload_cost(3.0)
    assert d.save_cost == (0.5, 2.0) and d.upload_cost == (3.0, 3.0)
    assert d.local.save_cost == (0.5, 2.0) and d.durable.save_cost == (3.0, 3.0)
    got = saves(d, range(1, 80), time=float)
    # local: max(1 s, 0.5 / 1%, 2 s) = 50 s after the first decision (t = 1); durable: max(1, 3 / 10%, 3) = 30 s
    assert [(s, bool(r), bool(u)) for s, r, u in got] == [(31, False, True), (51, True, False), (61, False, True)]


# -- resume ------------------------------------------------------------------------------------------


def test_a_tiered_state_round_trips_through_json_and_continues_exactly():
    policy = saverules.loads(TWO_TIERS.replace('kind = "every_steps"\nevery = 5', 'kind = "every_time"\nevery = "7s"'))
    run = policy.compile()
    first = saves(run, range(1, 11), time=float)
    state = json.loads(json.dumps(run.state_dict()))
    assert is_tiered_state(state) and set(state) == {"local", "durable", "policy"}
    assert state["policy"] == policy.digest
    resumed = policy.compile()
    r = resumed.load_state_dict(state)
    assert isinstance(r, TierResumed) and not r.policy_changed and r.message("here", 10) is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.durable = None  # type: ignore[misc]  # what a resume did is a fact: it cannot be changed
    assert saves(resumed, range(11, 40), time=float) == saves(run, range(11, 40), time=float)
    assert first  # the first part saved too


def test_a_one_tier_state_continues_the_local_tier_and_starts_the_durable_tier_fresh():
    one = saverules.loads(LOCAL_ONLY).compile()
    saves(one, range(1, 10))
    state = one.state_dict()
    two = saverules.loads(TWO_TIERS).compile()
    r = two.load_state_dict(state)
    message = r.message("checkpoint x", 9)
    assert r.durable is None and r.policy_changed
    assert "written under a policy without a durable tier" in message
    assert "the durable tier's rules start fresh from step 9" in message
    assert "the local tier: its rules are the same and keep their decider state" in message
    assert two.local.state_dict()["rules"] == state["rules"] and two.durable.state_dict()["prev_step"] == 9
    assert saves(two, range(10, 16)) == [(10, (), ("every_steps(every=5)",)),
                                         (12, ("every_steps(every=3)",), ()),
                                         (15, ("every_steps(every=3)",), ("every_steps(every=5)",))]


def test_a_tiered_state_into_a_one_tier_policy_continues_the_local_tier_and_says_the_durable_one_is_dropped():
    two = saverules.loads(TWO_TIERS).compile()
    saves(two, range(1, 10))
    one = saverules.loads(LOCAL_ONLY).compile()
    r = one.load_state_dict(two.state_dict())
    message = r.message("checkpoint x", 9)
    assert r.dropped_durable and not r.policy_changed
    assert "written under a policy with a durable tier ([durable]) and this policy has none" in message
    assert "the durable tier's decider state is dropped" in message
    assert one.state_dict() == {**two.local.state_dict(), "policy": one.policy.digest}


def test_a_two_tier_state_whose_tiers_are_not_tables_is_refused_saying_so():
    d = saverules.loads(TWO_TIERS).compile()
    for bad in ({"local": "junk", "durable": {}}, {"local": {}, "durable": ["x"]}):
        with pytest.raises(ValueError, match="a two-tier decider state holds a table for each tier"):
            d.load_state_dict(bad)
    with pytest.raises(ValueError, match="decider state must be a table, got list"):
        d.load_state_dict([1])  # type: ignore[arg-type]


def test_restore_decider_warns_what_it_did_with_each_tier():
    two_policy, one_policy = saverules.loads(TWO_TIERS), saverules.loads(LOCAL_ONLY)
    one_state = one_policy.compile().state_dict()
    two_state = two_policy.compile().state_dict()
    cases = [
        (two_policy.compile(), two_state, None),
        (two_policy.compile(), one_state, "the durable tier's rules start fresh from step 4"),
        (one_policy.compile(), two_state, "the durable tier's decider state is dropped"),
        (two_policy.compile(), {"local": "junk", "durable": {}}, "every rule starts fresh from step 4"),
    ]
    for decider, state, expected in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            restore_decider(decider, state, 4, 8.0, "checkpoint c")
        said = [str(w.message) for w in caught]
        if expected is None:
            assert said == []
        else:
            assert len(said) == 1 and expected in said[0] and "checkpoint c" in said[0], said
    # the fallback leaves both tiers as if they had just saved at step 4
    decider = cases[-1][0]
    assert decider.local.state_dict()["last_save_step"] == decider.durable.state_dict()["last_save_step"] == 4


def test_a_changed_durable_tier_names_the_tier_whose_rules_changed():
    two = saverules.loads(TWO_TIERS).compile()
    saves(two, range(1, 9))
    changed = saverules.loads(TWO_TIERS.replace("every = 5", "every = 4")).compile()
    message = changed.load_state_dict(two.state_dict()).message("c", 8)
    local_part, durable_part = message.split("The durable tier:")
    assert "The local tier: its rules are the same" in local_part
    assert "fresh: every_steps(every=4)" in durable_part or "kept: none" in durable_part


# -- the store's wrappers take it as they take a Decider -------------------------------------------------


def test_a_synced_decider_of_one_process_passes_the_durable_tier_through():
    d = SyncedDecider(saverules.loads(TWO_TIERS).compile(), rank=0, world_size=1)
    got = [d(Progress(s)) for s in range(1, 11)]
    assert got[4] == Decision(True, (), ("every_steps(every=5)",)) and got[4].tiers == ("local", "durable")
    d.note_upload_cost(2.0)
    assert d.upload_cost == (2.0, 2.0)
    assert is_tiered_state(d.state_dict())


def test_a_tiered_decider_watches_what_either_tier_watches():
    text = """version = 1
final = false
[[rules]]
kind = "epoch_end"
[durable]
final = false
[[durable.rules]]
kind = "every_time"
every = "1m"
"""
    d = saverules.loads(text).compile()
    assert d.watches_epochs and d.watches_time and not d.watches_last and not d.watches_metrics
    assert saverules.loads(LOCAL_ONLY.replace("final = false\n", "") + '[durable]\nfinal = false\n').compile().watches_last
    d(Progress(1, time=10.0))
    assert d.local.next_time == float("inf") and d.next_time == d.durable.next_time == 70.0
    metric = LOCAL_ONLY + '[durable]\n[[durable.rules]]\nkind = "improved"\nmetric = "val_loss"\n'
    assert saverules.loads(metric).compile().watches_metrics, "a metric rule of the durable tier alone"


# -- the pure parts the store runs -----------------------------------------------------------------------


def test_a_durable_save_or_a_signal_save_is_promoted_and_a_final_or_signal_one_is_never_replaced():
    from saverules.engine.tiers import must_reach_durable, promoted

    assert promoted(Decision(True, ("every_steps(every=3)",), ("every_steps(every=5)",))) == ("every_steps(every=5)",)
    assert promoted(Decision(True, ("on_signal(SIGUSR1)", "every_steps(every=3)"))) == ("on_signal(SIGUSR1)",)
    assert promoted(Decision(True, ("on_signal",))) == ("on_signal",)
    assert promoted(Decision(True, ("every_steps(every=3)", "any(on_signal, final)"))) == ()
    assert promoted(Decision(False)) == ()
    assert not must_reach_durable(("every_steps(every=5)",))
    assert must_reach_durable(("final",)) and must_reach_durable(("every_steps(every=5)", "on_signal"))
    assert must_reach_durable(("on_signal(SIGTERM)",)) and not must_reach_durable(("on_signals",))


def test_the_promotion_queue_by_example():
    from saverules.engine.tiers import PromotionQueue

    q: PromotionQueue[str] = PromotionQueue()
    assert q.offer("a") is None and q.start() == "a" and q.start() is None
    assert q.offer("b") is None and q.offer("c") == "b", "a newer promotion replaces a waiting one"
    assert q.offer("d", pinned=True) == "c" and q.offer("e") is None and q.offer("f") == "e"
    assert q.waiting == ("d", "f") and q.pinned_waiting() == ("d",) and q.pending() == {"a", "d", "f"}
    assert q.offer("f", pinned=True) is None and q.pinned_waiting() == ("d", "f"), "offered again: pinned now"
    assert q.offer("a") is None and len(q) == 3, "the running one is not queued again"
    assert q.finish() == "a" and q.start() == "d" and q.finish() == "d" and q.start() == "f"
    assert q.finish() == "f" and q.start() is None and len(q) == 0
    with pytest.raises(RuntimeError, match="no upload running"):
        q.finish()


def test_what_is_protected_by_example():
    from saverules.engine.tiers import Protected

    p: Protected[int] = Protected(newest=30, resumed_from=20)
    assert p.names() == {20, 30} and 20 in p and None not in p and 10 not in p
    p.hold(31)
    p.hold(31)  # offered twice: held until released twice
    p.committed(31)
    assert p.names() == {31} and 20 not in p, "a newer commit ends the resume's hold"
    p.release(31)
    p.committed(32)
    assert 31 in p
    p.release(31)
    p.release(99)  # never held: nothing happens
    assert p.names() == {32}
    assert p.keep([30, 31, 32], [False, True, False]) == [False, True, True]
    with pytest.raises(ValueError, match="2 answers for 3 checkpoints"):
        p.keep([30, 31, 32], [True, True])
    for _ in range(3):
        p.hold(40)
    p.release(40)
    p.release(40)
    assert 40 in p, "held three times, released twice: still held"
    p.release(40)
    assert 40 not in p
    again: Protected[str] = Protected(resumed_from="x")
    again.committed("x")  # the resume's own checkpoint, committed into this tier (a download)
    assert again.resumed_from == "x" and "x" in again

"""The save count of a run too long to list (saverules.engine.count), checked exactly where
mutation testing found it unchecked: merging ranges, at_steps in a huge run, the step of
the last counted save, and the sieve that counts many pieces over a short stretch."""
from __future__ import annotations

import pytest

from saverules import Policy
from saverules.engine.count import WORK, _Budget, _count_union, _merged, _sieve, _TooCostly, count_union, pieces

PRIMES = [p for p in range(2, 360) if all(p % d for d in range(2, int(p**0.5) + 1))][:70]


def _policy(rules, final=False):
    return Policy.model_validate({"version": 1, "final": final, "rules": rules})


def _brute(all_pieces, lo, hi):
    return sum(1 for s in range(lo + 1, hi + 1) if any(plo < s <= phi and s % k == 0 for plo, phi, k in all_pieces))


def test_merged_joins_overlapping_and_touching_ranges_in_order():
    assert _merged([(5, 10), (0, 3), (3, 4), (8, 20), (30, 40), (31, 33)]) == [(0, 4), (5, 20), (30, 40)]
    assert _merged([]) == []
    assert _merged([(7, 9)]) == [(7, 9)]


def test_the_complement_of_windows_is_counted_exactly_in_a_huge_run():
    # not(any(windows)): fires outside (10, 20] U (15, 30] U (30, 40], i.e. at 1-10 and 41-...
    rule = {"kind": "not", "rule": {"kind": "any", "rules": [
        {"kind": "window", "after": 10, "until": 20}, {"kind": "window", "after": 15, "until": 30},
        {"kind": "window", "after": 30, "until": 40}]}}
    node = _policy([rule]).compile(10**12)._compiled[0][0]
    assert pieces(node, 10**12, None, _Budget(WORK)) == [(0, 10, 1), (40, 1 << 64, 1)]
    sim = _policy([rule]).simulate(10**12, max_saves=5)
    assert not sim.complete and sim.save_count == 10 + (10**12 - 40)
    assert sim.last_saved == 10**12


def test_at_steps_in_a_huge_run_are_counted_not_unknown():
    rules = [{"kind": "every_steps", "every": 10**9}, {"kind": "at_steps", "steps": [5, 7, 10**11, 10**11 + 3]}]
    sim = _policy(rules).simulate(10**12, max_saves=10)
    assert not sim.complete
    assert sim.save_count == 1000 + 3  # 10^11 is a multiple of 10^9: saved once
    assert sim.fired_total == {"every_steps(every=1000000000)": 1000,
                               "at_steps(steps=[5, 7, 100000000000, 100000000003])": 4}


@pytest.mark.parametrize("every, total, last", [(7, 10**6, 999_999), (10, 10**6, 10**6), (999, 123_456_789, 123_456_420)])
def test_the_last_counted_save_is_the_last_multiple_in_the_run(every, total, last):
    sim = _policy([{"kind": "every_steps", "every": every}]).simulate(total, max_saves=10)
    assert not sim.complete and sim.save_count == total // every
    assert sim.last_saved == last and sim.unsaved_tail == total - last


def test_many_pieces_over_a_short_stretch_are_counted_by_the_sieve_exactly():
    all_pieces = [(0, 1 << 64, p) for p in PRIMES]
    with pytest.raises(_TooCostly):  # inclusion-exclusion of 70 small primes costs too much here
        _count_union(all_pieces, 0, 200_000, _Budget(WORK // 8))
    expected = _brute(all_pieces, 0, 200_000)
    assert count_union(all_pieces, 0, 200_000, _Budget(WORK)) == expected
    # the same count through a simulation whose listing stops early
    sim = _policy([{"kind": "every_steps", "every": p} for p in PRIMES]).simulate(200_000, max_saves=10)
    assert not sim.complete and sim.save_count == expected


def test_the_sieve_clips_pieces_to_the_stretch():
    stretch = (1000, 5000)
    all_pieces = [(0, 1 << 64, 7), (900, 1100, 3), (4900, 6000, 11), (2000, 2005, 10), (3001, 3009, 10),
                  (100, 200, 1), (1500, 1501, 1), (999, 1000, 2), (5000, 5001, 1)]
    assert _sieve(all_pieces, *stretch, _Budget(WORK)) == _brute(all_pieces, *stretch)
    assert _sieve([(0, 1 << 64, 1)], *stretch, _Budget(WORK)) == 4000
    assert _sieve([(0, 1 << 64, 5001)], *stretch, _Budget(WORK)) == 0

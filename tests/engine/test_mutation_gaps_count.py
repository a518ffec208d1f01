"""saverules.engine.count where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

from saverules.engine.count import WORK, _Budget, _count_union, count_union

PRIMES = [p for p in range(2, 800) if all(p % d for d in range(2, int(p**0.5) + 1))][:100]


def _brute(all_pieces, lo, hi):
    return sum(1 for s in range(lo + 1, hi + 1) if any(plo < s <= phi and s % k == 0 for plo, phi, k in all_pieces))


def test_many_pieces_counted_by_arithmetic_charge_the_budget_only_what_they_cost():
    # more than 64 pieces over a short stretch: the arithmetic is tried on a small budget first; when it
    # succeeds, the caller's budget pays what the trial spent, no more (a count of several reasons shares it)
    all_pieces = [(0, 5_000, p) for p in PRIMES[60:]] + [(0, 5_000, 1_000 + 7 * i) for i in range(30)]
    assert len(all_pieces) > 64
    alone = _Budget(WORK)
    expected = _count_union(all_pieces, 0, 5_000, alone)
    cost = WORK - alone.left
    assert 0 < cost < WORK // 8  # the trial succeeds
    assert expected == _brute(all_pieces, 0, 5_000)
    budget = _Budget(WORK)
    assert count_union(all_pieces, 0, 5_000, budget) == expected
    assert budget.left == WORK - cost
    # and so a second count on the same budget still fits
    assert count_union(all_pieces, 0, 5_000, budget) == expected
    assert budget.left == WORK - 2 * cost


def test_a_trial_that_spends_its_whole_budget_is_charged_in_full():
    all_pieces = [(0, 5_000, p) for p in PRIMES[60:]] + [(0, 5_000, 1_000 + 7 * i) for i in range(30)]
    probe = _Budget(WORK)
    _count_union(all_pieces, 0, 5_000, probe)
    cost = WORK - probe.left
    budget = _Budget(cost)  # the trial's budget is all that is left, and the count spends exactly all of it
    assert count_union(all_pieces, 0, 5_000, budget) == _brute(all_pieces, 0, 5_000)
    assert budget.left == 0


def test_arithmetic_too_costly_for_its_trial_gives_way_to_the_sieve_at_a_fixed_charge():
    # the arithmetic is tried on WORK // 8 only; past that the steps are marked, for that charge plus the sieve's
    from saverules.engine.count import _sieve

    all_pieces = [(0, 200_000, p) for p in PRIMES[10:90]]  # 80 primes from 31: about 108,000 of work
    probe = _Budget(WORK)
    _count_union(all_pieces, 0, 200_000, probe)
    assert WORK // 8 < WORK - probe.left < WORK  # the arithmetic alone would fit the whole budget
    sieved = _Budget(WORK)
    expected = _sieve(all_pieces, 0, 200_000, sieved)
    budget = _Budget(WORK)
    assert count_union(all_pieces, 0, 200_000, budget) == expected
    assert budget.left == sieved.left - WORK // 8


def test_arithmetic_that_fits_the_trial_just_below_its_limit_is_not_sieved():
    all_pieces = [(0, 200_000, p) for p in PRIMES[20:85]]  # 65 primes from 73: about 48,000 of work
    probe = _Budget(WORK)
    expected = _count_union(all_pieces, 0, 200_000, probe)
    cost = WORK - probe.left
    assert WORK // 9 < cost <= WORK // 8  # fits the trial's WORK // 8, and nothing smaller
    budget = _Budget(WORK)
    assert count_union(all_pieces, 0, 200_000, budget) == expected
    assert budget.left == WORK - cost  # counted by arithmetic, charged what it cost

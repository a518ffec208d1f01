"""The cost report's optimum for a run shorter than one optimal interval: one save, at the end."""
from __future__ import annotations

import math

import pytest

from saverules.engine.cost import _periodic_waste, cost_report, daly_interval


def test_a_run_shorter_than_one_interval_saves_once_at_its_end():
    c, mtbf, restart = 60.0, 86_400.0, 30.0
    interval = daly_interval(c, mtbf)
    run = interval / 4
    saves, waste = _periodic_waste(interval, run, c, mtbf, restart)
    assert saves == 1
    assert waste == pytest.approx(c + run / mtbf * (run / 2 + restart), rel=1e-12)


def test_the_report_names_that_one_save():
    # 100 steps of 1 s against an optimal interval of hours
    report = cost_report([100], 100, 1.0, peak_kept=1, save_seconds=60.0, mtbf=86_400.0, restart_seconds=30.0)
    assert report.optimum_interval > 100 and report.optimum_saves == 1
    assert report.optimum_waste_seconds == pytest.approx(60.0 + 100 / 86_400 * (50 + 30), rel=1e-12)
    assert report.waste_seconds == pytest.approx(report.optimum_waste_seconds, rel=1e-12)  # it is the optimum


@pytest.mark.parametrize("k", [1, 2, 7])
def test_a_run_of_whole_intervals_saves_at_each(k):
    interval = 1000.0
    saves, waste = _periodic_waste(interval, k * interval, 10.0, 1e6, 0.0)
    assert saves == k
    assert math.isclose(waste, k * 10.0 + k * interval / 1e6 * (interval / 2), rel_tol=1e-12)

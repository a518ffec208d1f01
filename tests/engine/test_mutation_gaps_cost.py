"""saverules.engine.cost and .quantities where the mutation sample of issue 17 found them unchecked."""
from __future__ import annotations

from saverules.engine.cost import SAVING_SHARE_WARNING, CostReport
from saverules.engine.quantities import format_bytes


def test_saving_is_too_costly_only_above_the_warning_share():
    assert not CostReport(saves=1, saving_share=SAVING_SHARE_WARNING).saving_too_costly
    assert CostReport(saves=1, saving_share=SAVING_SHARE_WARNING * 1.0001).saving_too_costly
    assert not CostReport(saves=1, saving_share=None).saving_too_costly


def test_each_byte_unit_starts_at_its_own_power_of_1000():
    assert [format_bytes(n) for n in (999, 1000, 999_999, 10**6, 10**9 - 1, 10**9, 10**12)] == [
        "999B", "1KB", "1e+03KB", "1MB", "1e+03MB", "1GB", "1TB"]
    assert format_bytes(1_001_000) == "1MB" and format_bytes(2_500_000) == "2.5MB"

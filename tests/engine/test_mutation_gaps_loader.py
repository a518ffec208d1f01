"""saverules.engine.loader where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

import pytest

from saverules import PolicyError, loads


@pytest.mark.parametrize(("text", "where"), [
    ("version = = 1\n[run]\ntotal_steps = 10\n", "p.toml:1:"),
    ("version = 1\n[run]\ntotal_steps = = 10\n", "p.toml:3:"),
])
def test_a_syntax_error_names_its_own_line(text, where):
    with pytest.raises(PolicyError) as e:
        loads(text, source="p.toml")
    assert where in str(e.value) and "TOML syntax" in str(e.value)

"""saverules.engine.progress where the mutation sample of issue 17 found it unchecked (docs/testing.md)."""
from __future__ import annotations

import pytest

import saverules


def test_a_bad_value_is_shown_whole_up_to_60_characters_and_cut_after():
    with pytest.raises(TypeError) as whole:
        saverules.Progress(step="x" * 58)  # its repr has exactly 60 characters
    assert f"got {'x' * 58!r} (str)" in str(whole.value)
    with pytest.raises(TypeError) as cut:
        saverules.Progress(step="x" * 59)  # 61: cut to 57 and "..."
    assert f"got '{'x' * 56}... (str)" in str(cut.value)


def test_a_checkpoint_as_retention_sees_it_is_immutable_and_hashable():
    import dataclasses

    from saverules import Checkpoint

    c = Checkpoint(10, 5.0, {"loss": 1.0})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.step = 11  # type: ignore[misc]
    assert Checkpoint(10) in {Checkpoint(10)}

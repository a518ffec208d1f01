"""Safe types: the store refuses what a weights-only load could not read back, before writing."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from store_common import (
    checkpoint_dirs,
    hidden_entries,
    policy,
    seed_all,
)

from saverules import Progress
from saverules.torch import (
    Checkpointer,
    StateTypeError,
    restore_rng_state,
    rng_state,
)

# --------------------------------------------------------------------------
# Safe types
# --------------------------------------------------------------------------


class Evil:
    pass


@pytest.mark.parametrize(
    "value, fragment",
    [
        (np.zeros(3), "numpy"),
        (np.float64(1.5), "numpy"),
        ({1, 2}, "sorted list"),
        (Evil(), "Evil"),
        ({"k": [1, object()]}, "state['bad']['k'][1]"),
        ({(1, 2): 3}, "dict key"),
        (torch.zeros(3).to_sparse(), "sparse"),
        (torch.zeros(2, device="meta"), "meta"),
    ],
)
def test_unsafe_values_are_refused_before_anything_is_written(tmp_path, value, fragment):
    ck = Checkpointer(policy(), tmp_path, async_save=True)
    with pytest.raises(StateTypeError) as info:
        ck.save(Progress(1), {"bad": value, "model": torch.nn.Linear(2, 2)})
    assert fragment in str(info.value)
    ck.close()
    assert checkpoint_dirs(tmp_path) == [] and hidden_entries(tmp_path) == []


def test_unsafe_values_raise_even_with_on_error_warn(tmp_path):
    ck = Checkpointer(policy(), tmp_path, on_error="warn")
    with pytest.raises(StateTypeError):
        ck.save(Progress(1), {"bad": np.ones(2)})


def test_state_keys_must_be_strings(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    with pytest.raises(StateTypeError, match="strings"):
        ck.save(Progress(1), {1: 2})


def test_rng_state_is_safe_and_restores_every_generator(tmp_path):
    seed_all(5)
    if torch.cuda.is_available():  # pragma: no cover - CPU CI
        torch.cuda.manual_seed_all(5)
    snapshot = rng_state()
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(1), {"rng": snapshot})
    seed_all(77)
    state = {"rng": None}
    Checkpointer(policy(), tmp_path).load_latest(state)
    restore_rng_state(state["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
    assert set(state["rng"]) >= {"python", "torch", "numpy"}


def test_restore_rng_state_rejects_non_mappings():
    with pytest.raises(TypeError, match="rng_state"):
        restore_rng_state([1, 2])

"""The Checkpointer resumed under a changed policy: rules matched by what they are, one warning."""
from __future__ import annotations

import warnings

import torch

import saverules
from saverules.store import Checkpointer

OLD = """
version = 1
final = false
[[rules]]
kind = "improved"
metric = "val_loss"
mode = "min"
"""

NEW = """
version = 1
final = false
[[rules]]
kind = "improved"
metric = "accuracy"
mode = "max"
[[rules]]
kind = "improved"
metric = "val_loss"
mode = "min"
"""


def test_a_new_first_rule_starts_fresh_and_the_old_rule_keeps_its_best(tmp_path):
    model = torch.nn.Linear(2, 1)
    with Checkpointer(saverules.loads(OLD), dir=tmp_path) as ckpt:
        for step, loss in ((10, 3.0), (20, 2.5)):
            assert ckpt.step(saverules.Progress(step, metrics={"val_loss": loss}), {"model": model})
    new = saverules.loads(NEW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = Checkpointer(new, dir=tmp_path)
        info = ckpt.load_latest({"model": model})
    try:
        assert info is not None and info.step == 20
        said = [str(w.message) for w in caught if "different policy" in str(w.message)]
        assert len(said) == 1, [str(w.message) for w in caught]
        assert 'fresh: improved(metric="accuracy", mode="max")' in said[0]
        assert 'kept: improved(metric="val_loss", mode="min")' in said[0]
        saved = [step for step, acc in ((30, 0.5), (40, 0.7), (50, 0.9))
                 if ckpt.step(saverules.Progress(step, metrics={"accuracy": acc, "val_loss": 2.6}), {"model": model})]
        assert saved == [30, 40, 50]  # a fresh accuracy rule saves all three
        # the val_loss rule kept its best of 2.5
        assert not ckpt.step(saverules.Progress(60, metrics={"val_loss": 2.55}), {"model": model})
    finally:
        ckpt.close()


def test_the_same_policy_resumes_without_a_warning(tmp_path):
    model = torch.nn.Linear(2, 1)
    with Checkpointer(saverules.loads(OLD), dir=tmp_path) as ckpt:
        ckpt.step(saverules.Progress(10, metrics={"val_loss": 1.0}), {"model": model})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(saverules.loads(OLD), dir=tmp_path) as again:
            assert again.load_latest({"model": model}) is not None
            assert not again.step(saverules.Progress(11, metrics={"val_loss": 1.5}), {"model": model})
    assert not [w for w in caught if "policy" in str(w.message)]

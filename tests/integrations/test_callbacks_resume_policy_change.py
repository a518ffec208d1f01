"""Both trainer callbacks resumed under a changed policy: the store's one rule (rules matched by what they are)."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hf_common import make_trainer
from lightning_common import fit

import saverules
from saverules.lightning import SaverulesCheckpoint
from saverules.transformers import SaverulesCallback, last_good_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning")

# the rising-loss rule fires at the first evaluation and then only if the loss ever rises above it
RISE = 'version = 1\n[[rules]]\nkind = "improved"\nmetric = "{m}"\nmode = "max"\n'
# the same rule behind a new first rule that never fires in these runs
RISE_BEHIND_NEW = ('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 1000\n'
                   '[[rules]]\nkind = "improved"\nmetric = "{m}"\nmode = "max"\n')


def _rises(values):
    """Steps at which a value beats every value before it (the improved rule's saves, mode max)."""
    best, out = None, []
    for step, v in values:
        if best is None or v > best:
            best = v
            out.append(step)
    return out


def _said(caught):
    return [str(w.message) for w in caught if "different policy" in str(w.message)]


def test_hf_callback_keeps_the_state_of_an_unchanged_rule_and_warns_once(tmp_path):
    first = SaverulesCallback(saverules.loads(RISE.format(m="eval_loss")))
    t1 = make_trainer(tmp_path, [first], max_steps=60, eval_steps=10)
    t1.train()
    evals1 = [(e["step"], e["eval_loss"]) for e in t1.state.log_history if "eval_loss" in e]
    cb = SaverulesCallback(saverules.loads(RISE_BEHIND_NEW.format(m="eval_loss")))
    t2 = make_trainer(tmp_path, [cb], max_steps=130, eval_steps=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t2.train(resume_from_checkpoint=last_good_checkpoint(tmp_path))
    said = _said(caught)
    assert len(said) == 1 and 'improved(metric="eval_loss", mode="max"))' in said[0], said
    assert "fresh: none had any to drop" in said[0]
    evals2 = [(e["step"], e["eval_loss"]) for e in t2.state.log_history if "eval_loss" in e and e["step"] > 60]
    # the rule continues from run 1's highest loss: a fresh rule would save the first evaluation (70)
    rises = [s for s in _rises(evals1 + evals2) if s > 60]
    assert 70 not in rises
    assert cb.saved_steps == sorted(set(rises) | {130})


def test_lightning_callback_keeps_the_state_of_an_unchanged_rule_and_warns_once(tmp_path):
    d = tmp_path / "ckpts"
    pfile = tmp_path / "p.toml"
    pfile.write_text(RISE.format(m="val_loss"))
    first = SaverulesCheckpoint(str(pfile), dirpath=d)
    fit(tmp_path, [first], val=True, max_steps=60, val_check_interval=None, check_val_every_n_epoch=10)
    assert first.saved_steps[0] == 10 and first.saved_steps[-1] == 60  # the first validation fired the rule
    pfile.write_text(RISE_BEHIND_NEW.format(m="val_loss"))
    cb = SaverulesCheckpoint(str(pfile), dirpath=d)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [cb], val=True, max_steps=130, val_check_interval=None, check_val_every_n_epoch=10,
            ckpt_path=SaverulesCheckpoint.last_good(d))
    said = _said(caught)
    assert len(said) == 1 and 'improved(metric="val_loss", mode="max"))' in said[0], said
    # the kept rule remembers run 1's highest loss; a fresh one would save the first validation, step 70
    assert 70 not in cb.saved_steps
    assert cb.saved_steps[-1] == 130
    saved = torch.load(Path(d) / "step-00000130.ckpt", weights_only=False)["callbacks"]["SaverulesCheckpoint"]
    assert saved["decider"]["rules"], saved

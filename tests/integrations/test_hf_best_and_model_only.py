"""HF's load_best_model_at_end and save_only_model next to the callback: refused, or said plainly."""
from __future__ import annotations

import warnings

import pytest
from hf_common import make_trainer, weights

import saverules
from saverules.transformers import ConflictingSettingsError, SaverulesCallback, best_checkpoint, last_good_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning")

BEST = ('version = 1\n[[rules]]\nkind = "improved"\nmetric = "eval_loss"\nmode = "min"\n'
        '[[rules]]\nkind = "every_steps"\nevery = 20\n'
        '[retention]\nkeep_last = 1\n[retention.keep_best]\nmetric = "eval_loss"\nmode = "min"\n')


def test_load_best_model_at_end_is_refused_with_what_to_use_instead(tmp_path):
    cb = SaverulesCallback(saverules.loads(BEST))
    with pytest.raises(ConflictingSettingsError) as err:
        make_trainer(tmp_path, [cb], load_best_model_at_end=True, metric_for_best_model="eval_loss")
    message = str(err.value)
    assert "load_best_model_at_end" in message and "best_checkpoint(output_dir" in message
    assert 'kind = "improved", metric = "eval_loss", mode = "min"' in message


def test_best_checkpoint_finds_the_kept_checkpoint_with_the_best_eval_loss(tmp_path):
    cb = SaverulesCallback(saverules.loads(BEST))
    trainer = make_trainer(tmp_path, [cb], max_steps=130, eval_steps=10)
    trainer.train()
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    best_step = min(evals, key=lambda s: (evals[s], s))
    path = best_checkpoint(tmp_path, "eval_loss", "min")
    assert path == str(tmp_path / f"checkpoint-{best_step}")
    assert set(weights(path)) == {"linear.weight", "linear.bias"}
    assert best_checkpoint(tmp_path, "no_such_metric") is None
    with pytest.raises(ValueError, match="'min' or 'max'"):
        best_checkpoint(tmp_path, "eval_loss", "lowest")


def test_a_model_only_checkpoint_is_offered_with_a_warning_that_it_restarts_the_optimizer(tmp_path):
    cb = SaverulesCallback(saverules.loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 40\n'))
    make_trainer(tmp_path, [cb], max_steps=80, save_only_model=True).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = last_good_checkpoint(tmp_path)
    assert path == str(tmp_path / "checkpoint-80")
    said = [str(w.message) for w in caught if "model only" in str(w.message)]
    assert len(said) == 1 and "restarts the optimizer" in said[0]
    # a full checkpoint is offered without a word
    full = tmp_path / "full"
    make_trainer(full, [SaverulesCallback(saverules.loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 40\n'))],
                 max_steps=40).train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert last_good_checkpoint(full) == str(full / "checkpoint-40")
    assert not [w for w in caught if "model only" in str(w.message)]

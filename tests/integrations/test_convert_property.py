"""Property: a policy converted from random valid HF and Lightning settings simulates the
trainer's own schedule (the converter's model of it, checked against real runs in
test_convert_trainers.py), plus the final step, and passes `check --strict`."""
from __future__ import annotations

import tempfile
from pathlib import Path

from convert_common import strict_check
from hypothesis import given
from hypothesis import strategies as st

import saverules
from saverules.importers import hf, lightning
from saverules.importers.draft import Draft

totals = st.integers(1, 400)
epoch_lengths = st.integers(1, 60)


def _expect(draft: Draft, total: int, spe: int | None, keep: int | None) -> None:
    text = draft.toml()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.toml"
        path.write_text(text)
        rc, said = strict_check(path)
    assert rc == 0, said + text
    policy = saverules.loads(text)
    trainer = draft.trainer(total, spe)
    assert trainer.why_not is None
    sim = policy.simulate(total, spe)
    assert sim.saved_steps == sorted(set(trainer.saved) | {total})
    assert set(sim.saved_steps) - set(trainer.saved) <= {total}  # the only addition is the final step
    newest = sim.saved_steps if keep is None else sim.saved_steps[-max(keep, 2):]  # 1 becomes 2, for --strict
    assert sim.kept == newest
    if keep is None:
        assert list(trainer.kept) == list(trainer.saved)
    else:
        assert list(trainer.kept) == list(trainer.saved)[-keep:]


@given(total=totals, spe=epoch_lengths, strategy=st.sampled_from(["steps", "epoch", "no"]),
       save_steps=st.one_of(st.integers(1, 500), st.floats(0.001, 0.999, allow_nan=False)),
       limit=st.one_of(st.none(), st.integers(-1, 6)))
def test_hf_settings_simulate_the_trainers_schedule(total, spe, strategy, save_steps, limit):
    fields = {"save_strategy": strategy, "save_steps": save_steps, "save_total_limit": limit, "max_steps": total}
    draft = hf.convert(fields, "property", steps_per_epoch=spe)
    _expect(draft, total, spe, limit if limit is not None and limit > 0 else None)


@given(total=totals, spe=epoch_lengths, trigger=st.sampled_from(["every_n_train_steps", "every_n_epochs", None]),
       every=st.integers(1, 120), top_k=st.sampled_from([-1, 0, 1]), save_last=st.sampled_from([None, False, True, "link"]))
def test_lightning_settings_simulate_the_callbacks_schedule(total, spe, trigger, every, top_k, save_last):
    kwargs: dict[str, object] = {"save_top_k": top_k, "save_last": save_last}
    if trigger is not None:
        kwargs[trigger] = every
    if top_k == 0 and not save_last:
        return  # refused: writes nothing (tested in test_convert.py)
    call = "ModelCheckpoint(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    draft = lightning.convert(lightning.parse(call), "property", total_steps=total, steps_per_epoch=spe)
    _expect(draft, total, spe, None if top_k == -1 else 1)

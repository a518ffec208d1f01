"""What the HF callback times as a save's cost: the save, not an evaluation the Trainer runs first.

A real ``transformers.Trainer`` on CPU, in this process: an adaptive rule beside a step rule
that asks for a save at steps 3 and 6, where the Trainer also evaluates (and the evaluation
sleeps 0.6 s) before it saves.  The save itself is quick, so each reported cost stays well
under the evaluation's time, and the decider's estimate is the mean of exactly those reports.
"""
from __future__ import annotations

import time

import torch
from hf_common import Points, TinyRegressor
from transformers import Trainer, TrainerCallback, TrainingArguments

import saverules
from saverules.transformers import SaverulesCallback

EVAL_SLEEP = 0.6
POLICY = '''version = 1
[[rules]]
kind = "every_steps"
every = 3
[[rules]]
kind = "adaptive"
max_overhead = "50%"
min_every = "1h"
'''


class SlowEval(TinyRegressor):
    def forward(self, x, labels=None):
        if not self.training:
            time.sleep(EVAL_SLEEP / 4)  # 32 points in batches of 8: 4 batches an evaluation
        return super().forward(x, labels)


class Evaluations(TrainerCallback):
    def __init__(self):
        self.seconds: list[float] = []
        self.started = 0.0

    def on_step_end(self, args, state, control, **kw):
        self.started = time.perf_counter()

    def on_evaluate(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.started)


def test_an_evaluation_before_the_save_is_not_counted_in_its_cost(tmp_path):
    policy = saverules.loads(POLICY)
    cb = SaverulesCallback(policy)
    evals = Evaluations()
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=0.01,
        save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True, use_cpu=True,
        eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=8, dataloader_num_workers=0)
    trainer = Trainer(model=SlowEval(), args=args, train_dataset=Points(64), eval_dataset=Points(32, seed=1),
                      callbacks=[cb, evals])
    trainer.train()
    assert cb.saved_steps == [3, 6]
    assert len(evals.seconds) == 2 and min(evals.seconds) >= EVAL_SLEEP  # each evaluation took its sleep
    costs = [stall for stall, _ in cb.save_costs]
    assert len(costs) == 2 and all(0 < c < EVAL_SLEEP for c in costs), costs
    decider = cb._decider
    assert decider is not None and decider.save_cost == (sum(costs) / 2, sum(costs) / 2)
    manifest = (tmp_path / "checkpoint-6" / "saverules-manifest.json").read_text()
    assert str(costs[-1]) in manifest  # the latest costs are recorded once the save has ended

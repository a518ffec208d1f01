"""The reference loop's two hooks, used in-process as a user would: ``clock`` and ``after_step``."""
from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FAST = ["--max_seq_len", "32", "--batch_size", "4", "--progress", "none"]


@pytest.fixture
def loop_process(tmp_path, monkeypatch):
    """Run the loop in this process: in tmp_path, with the signal handlers and threads put back after."""
    monkeypatch.chdir(tmp_path)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    threads = torch.get_num_threads()
    yield tmp_path
    for s, h in handlers.items():
        signal.signal(s, h)
    torch.set_num_threads(threads)


def test_the_policy_sees_the_given_clock_and_after_step_sees_every_decision(loop_process):
    from store_common import policy_toml

    from saverules.minimind.train import StepReport, main

    rules = loop_process / "p.toml"
    rules.write_text(policy_toml(None, every_time="1s", final=False))
    reads: list[float] = []

    def clock() -> float:  # a quarter of a second per optimizer step, from 0 at step 1
        reads.append(0.25 * len(reads))
        return reads[-1]

    reports: list[StepReport] = []
    assert main([*FAST, "--rules", str(rules), "--max_steps", "10"], clock=clock, after_step=reports.append) == 0
    assert reads == [0.25 * (s - 1) for s in range(1, 11)]  # read once per step
    assert [r.step for r in reports] == list(range(1, 11))
    assert all(r.total_steps == 10 and r.signal is None for r in reports)
    assert [r.step for r in reports if r.decision.save] == [5, 9]  # every 1 s of the given clock
    assert {r.decision.reasons for r in reports if r.decision.save} == {("every_time(every=1s)",)}
    assert reports[-1].checkpointer.latest().step == 9
    times = {json.loads(p.read_text())["step"]: json.loads(p.read_text())["time"]
             for p in (loop_process / "out").rglob("manifest.json")}
    assert times == {5: 1.0, 9: 2.0}


def test_the_after_step_example_in_docs_training_runs(loop_process, capsys):
    text = (REPO / "docs" / "training.md").read_text()
    (code,) = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if "StepReport" in b]
    exec(compile(code, "docs/training.md[after_step example]", "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    said = [int(m) for m in re.findall(r"^saved step (\d+):", out, re.M)]
    logged = [int(m) for m in re.findall(r"^step (\d+)/40 saved for ", out, re.M)]
    assert said and logged == said and said[-1] == 40

"""The removal log: every checkpoint retention deletes is recorded in the store, and `ls` accounts for it."""
from __future__ import annotations

import json
import warnings

import torch
from store_common import policy, run_ls

import saverules
from saverules.store import Checkpointer
from saverules.store.removed import MAX_BYTES, log_path, read, record, removal


def _save(ckpt: Checkpointer, steps, model) -> None:
    for step in steps:
        assert ckpt.step(saverules.Progress(step, total_steps=100), {"model": model})


def test_a_resume_under_a_smaller_keep_last_accounts_for_the_earlier_runs_checkpoints(tmp_path):
    model = torch.nn.Linear(2, 1)
    first = policy(every=10, final=False, keep_last=3)
    second = policy(every=10, final=False, keep_last=1)
    assert first.digest != second.digest
    with Checkpointer(first, dir=tmp_path) as ckpt:
        _save(ckpt, (10, 20, 30, 40, 50, 60), model)
    log = read(tmp_path)
    assert [(e["name"], e["step"]) for e in log.entries] == [
        ("step-00000010", 10), ("step-00000020", 20), ("step-00000030", 30)]
    assert {e["policy_digest"] for e in log.entries} == {first.digest}
    assert {e["why"] for e in log.entries} == {"no retention rule keeps it (keep_last = 3)"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the changed-policy warning is tested elsewhere
        ckpt = Checkpointer(second, dir=tmp_path)
        assert ckpt.load_latest({"model": model}).step == 60
    with ckpt:
        _save(ckpt, (70,), model)
    later = read(tmp_path).entries[3:]
    # the earlier run's 40, 50 and 60 go under the new policy's retention, and the log says so
    assert [(e["step"], e["policy_digest"]) for e in later] == [(40, second.digest), (50, second.digest),
                                                               (60, second.digest)]
    assert all(e["why"] == "no retention rule keeps it (keep_last = 1)" for e in later)
    times = [e["removed_at"] for e in read(tmp_path).entries]
    assert times == sorted(times)

    proc = run_ls(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "removed by retention (6):" in proc.stdout
    table = proc.stdout.split("removed by retention (6):", 1)[1]
    for step in (10, 20, 30, 40, 50, 60):
        assert f"step-{step:08d}" in table
    assert second.digest[:12] in table and first.digest[:12] in table
    assert "step-00000070" not in table  # kept: listed above, not as removed

    doc = json.loads(run_ls(tmp_path, "--json").stdout)
    assert [c["step"] for c in doc["checkpoints"]] == [70]
    assert [e["step"] for e in doc["removed"]] == [10, 20, 30, 40, 50, 60]
    assert doc["removed"][-1]["policy_digest"] == second.digest and doc["removed_dropped"] == 0


def test_a_store_whose_retention_removed_nothing_shows_no_removed_heading(tmp_path):
    with Checkpointer(policy(every=1, final=False), dir=tmp_path) as ckpt:
        _save(ckpt, (1, 2), torch.nn.Linear(2, 1))
    assert not log_path(tmp_path).parent.exists()
    proc = run_ls(tmp_path)
    assert proc.returncode == 0 and "removed by retention" not in proc.stdout
    assert json.loads(run_ls(tmp_path, "--json").stdout)["removed"] == []


def test_the_log_stays_within_its_bound_and_counts_what_it_dropped(tmp_path):
    p = policy(every=1, keep_last=1)
    total = 0
    while total < 3 * MAX_BYTES // 150:  # well past the bound
        record(tmp_path, [removal(f"step-{total + k:08d}", total + k, p, when=1000.0 + total + k) for k in range(50)])
        total += 50
        assert log_path(tmp_path).stat().st_size <= MAX_BYTES
    log = read(tmp_path)
    assert log.unreadable == 0 and log.error is None
    assert log.dropped + len(log.entries) == total
    assert log.dropped > 0
    steps = [e["step"] for e in log.entries]
    assert steps == list(range(total - len(steps), total))  # the newest, in order
    assert log.since(1000.0 + total - 10) == log.entries[-10:]

    proc = run_ls(tmp_path)
    assert f"({log.dropped} older removals are no longer in the log" in proc.stdout
    assert f"({len(steps) - 20} earlier removals not shown; ls --json lists them)" in proc.stdout


def test_a_line_cut_short_is_skipped_and_named(tmp_path):
    p = policy(every=1, keep_last=1)
    record(tmp_path, [removal("step-00000001", 1, p), removal("step-00000002", 2, p)])
    with open(log_path(tmp_path), "a") as f:
        f.write('{"name": "step-000000')  # a crash mid-append (or an append still going on)
    log = read(tmp_path)
    assert [e["step"] for e in log.entries] == [1, 2] and log.unreadable == 0  # may still be being written
    record(tmp_path, [removal("step-00000003", 3, p)])  # the next writer's append starts a line of its own
    log = read(tmp_path)
    assert [e["step"] for e in log.entries] == [1, 2, 3] and log.unreadable == 1
    proc = run_ls(tmp_path)
    assert "removed by retention (3):" in proc.stdout
    assert "1 line of" in proc.stderr and "could not be read (a write cut short) and was skipped" in proc.stderr


def test_a_log_that_cannot_be_written_warns_once_and_the_saves_go_on(tmp_path):
    (tmp_path / ".saverules").write_text("a file where the log's folder belongs")
    model = torch.nn.Linear(2, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(policy(every=1, final=False, keep_last=1), dir=tmp_path) as ckpt:
            _save(ckpt, (1, 2, 3, 4), model)
    said = [str(w.message) for w in caught if "could not record" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert str(log_path(tmp_path)) in said[0] and "`saverules.ls` will not list them" in said[0]
    assert [i.step for i in Checkpointer(policy(every=1), dir=tmp_path, read_only=True).list()] == [4]

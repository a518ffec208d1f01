"""The reference loop with a durable tier (``--durable URL``) on moto's S3 server, run as real subprocesses.

* ``--durable`` without a ``[durable]`` table in the policy is a usage error.
* A run is SIGKILLed; a new node (an empty ``--out_dir``) resumes from the
  durable tier and ends bit for bit where an uninterrupted run ends.
* SIGTERM (preemption) saves at once, the upload finishes in ``close``, and
  the summary says what reached the durable tier.
* When the final step cannot reach the durable tier (the server is down), the
  loop exits 1 and names the step.
"""
from __future__ import annotations

import secrets
import signal
import subprocess
import time

import pytest
from s3_server import BUCKET
from test_train import (
    ON_SIGNAL,
    checkpoints,
    env_for,
    payload,
    run_train,
    same_tensors,
    saved_lines,
    train_cmd,
    wait_for_line,
    write_policy,
)

from saverules.store.remote import DurableTier

POLICY = """
version = 1
final = true

[[rules]]
kind = "every_steps"
every = 2

[[rules]]
kind = "on_signal"
signals = ["SIGTERM", "SIGUSR1"]

[retention]
keep_last = 2

[durable]
options = {config_kwargs = {retries = {max_attempts = 1}}}

[[durable.rules]]
kind = "every_steps"
every = 4

[[durable.rules]]
kind = "on_signal"
signals = ["SIGTERM"]

[durable.retention]
keep_last = 2
"""


def durable_reason(index: int) -> str:
    """What the engine prints for ``[[durable.rules]]`` number ``index`` of POLICY (its own rendering)."""
    import saverules
    from saverules.engine.rules import describe

    table = saverules.loads(POLICY).durable
    assert table is not None
    return describe(table.rules[index])


def new_url() -> str:
    return f"s3://{BUCKET}/run-{secrets.token_hex(4)}"


def durable_steps(url: str) -> list[tuple[int | None, bool | None]]:
    return [(i.step, i.verified) for i in DurableTier(url, writer=False).list(verify=True)]


def start(cwd, *args, driver=()):
    return subprocess.Popen(train_cmd(*args, driver=list(driver)), cwd=cwd, env=env_for(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_durable_without_a_durable_table_is_a_usage_error(tmp_path, monkeypatch, capsys):
    from saverules.minimind.train import main

    monkeypatch.chdir(tmp_path)
    rules = write_policy(tmp_path / "p.toml", every=2)
    code = main(["--rules", rules, "--durable", "s3://bucket/run1", "--max_steps", "2", "--progress", "none"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--durable s3://bucket/run1: the policy" in err and "has no [durable] table" in err
    assert "[[durable.rules]]" in err  # what to add
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigkill_then_a_new_node_resumes_from_the_durable_tier_exactly(s3, tmp_path):
    (tmp_path / "full").mkdir()
    rules = write_policy(tmp_path / "tiers.toml", text=POLICY)
    full_url = new_url()
    full = run_train(tmp_path / "full", "--rules", rules, "--durable", full_url, "--max_steps", "12")
    assert full.returncode == 0, full.stderr
    assert "saved step 4: every_steps(every=2); to the durable tier for: every_steps(every=4)" in full.stdout
    assert "the final step 12 reached the durable tier" in full.stdout
    assert durable_steps(full_url) == [(8, True), (12, True)]
    (tmp_path / "again").mkdir()  # the same durable tier without --resume: refused, as a run folder is
    again = run_train(tmp_path / "again", "--rules", rules, "--durable", full_url, "--max_steps", "12")
    assert again.returncode == 2, again.stderr
    assert f"the durable tier {full_url} already holds checkpoints (latest: step 12)" in again.stderr
    assert "--resume" in again.stderr and "Traceback" not in again.stderr

    # the same run, killed after step 10 once step 8 is durable
    (tmp_path / "killed").mkdir()
    url = new_url()
    proc = start(tmp_path / "killed", "--rules", rules, "--durable", url, "--max_steps", "12",
                 driver=["--hold-at", "10"])
    try:
        wait_for_line(proc, "holding at step 10")
        deadline = time.monotonic() + 120
        while (8, True) not in durable_steps(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (8, True) in durable_steps(url)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()

    # a new node: nothing local, the durable tier only
    (tmp_path / "new-node").mkdir()
    resumed = run_train(tmp_path / "new-node", "--rules", rules, "--durable", url, "--max_steps", "12", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 8 (epoch 1/1) in the durable tier" in resumed.stdout
    assert saved_lines(resumed.stdout) == [10, 12]
    a, b = checkpoints(tmp_path / "full" / "out"), checkpoints(tmp_path / "new-node" / "out")
    assert same_tensors(payload(a[12])["objects"]["model"], payload(b[12])["objects"]["model"])
    assert durable_steps(url) == [(8, True), (12, True)]


@pytest.mark.slow
def test_sigterm_saves_at_once_and_the_upload_finishes_before_the_loop_exits(s3, tmp_path):
    rules = write_policy(tmp_path / "tiers.toml", text=POLICY)
    url = new_url()
    proc = start(tmp_path, "--rules", rules, "--durable", url, "--max_steps", "12", driver=["--hold-at", "4"])
    try:
        wait_for_line(proc, "holding at step 4")
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    # step 5: no step rule of either tier; the signal rule of each
    assert f"saved step 5: {ON_SIGNAL}; to the durable tier for: {durable_reason(1)}\n" in rest
    assert "stopped by SIGTERM after step 5 of 12" in rest
    assert "the final step 5 reached the durable tier" in rest
    assert durable_steps(url) == [(4, True), (5, True)]


@pytest.mark.slow
def test_a_final_step_that_cannot_reach_the_durable_tier_exits_1_and_names_it(s3, tmp_path):
    rules = write_policy(tmp_path / "tiers.toml", text=POLICY)
    url = new_url()
    proc = start(tmp_path, "--rules", rules, "--durable", url, "--max_steps", "8", "--durable_timeout", "2",
                 driver=["--hold-at", "7"])
    try:
        wait_for_line(proc, "holding at step 7")
        deadline = time.monotonic() + 120
        while (4, True) not in durable_steps(url) and time.monotonic() < deadline:
            time.sleep(0.2)
        s3.stop()
        proc.send_signal(signal.SIGUSR1)  # go on: step 8, the final step, cannot be uploaded
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        if s3._server is None:
            s3.start()
    assert proc.returncode == 1, (out, err)
    assert "the final step 8 did NOT reach the durable tier" in out
    assert "error:" in err and "step 8" in err and "Traceback" not in err
    assert sorted(checkpoints(tmp_path / "out")) == [6, 8], "the local tier has it"

"""Real faults on a two-tier Checkpointer (``durable=URL``), against moto's S3 server, file:// and memory://.

* A process saving with promotions is killed with SIGKILL at random moments,
  10 times; every time a new node (an EMPTY local directory) resumes from the
  newest committed durable checkpoint, bit for bit.  The tier never shows a
  checkpoint without its marker; a reader (``python -m saverules.ls URL``)
  leaves a killed upload's leftovers, the next writer removes them.
* The server stops in the middle of an upload and starts again: training goes
  on meanwhile, the local checkpoint awaiting upload is not deleted, and the
  upload is retried and completes.  An upload that cannot finish in time is
  reported by ``close(timeout)``, naming the final step.
* A flipped byte in a durable object: resume falls back to the durable
  checkpoint before it and says why.
* A second writer process on the same URL is refused, and the error names the
  holder (host, pid, since when).
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from durable_child import POLICY, digest, weights
from s3_server import BUCKET
from store_common import REPO

import saverules
from saverules import Progress
from saverules.store.errors import CheckpointError, CheckpointWarning, DurableError, StoreLockedError
from saverules.store.remote import MARKER, DurableTier
from saverules.store.remote.retry import Retries
from saverules.torch import Checkpointer

CHILD = str(REPO / "tests" / "helpers" / "durable_child.py")
#: botocore's own retries beneath saverules' retries: one attempt, so that an outage is seen at once.
FAST = {"config_kwargs": {"retries": {"max_attempts": 1}}}
#: saverules' retries: 60 attempts 0.2 s to 0.5 s apart (about 30 s), so that an upload resumes soon after an outage.
PATIENT = Retries(attempts=60, first=0.2, longest=0.5)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def two_tiers(every: int = 1, durable_every: int = 3, keep_last: int = 2, total: int | None = None) -> saverules.Policy:
    text = POLICY.format(every=durable_every).replace("every = 1\n", f"every = {every}\n", 1)
    text = text.replace("keep_last = 2", f"keep_last = {keep_last}", 1).replace("final = false", "final = true")
    if total is not None:
        text = text.replace("version = 1\n", f"version = 1\n[run]\ntotal_steps = {total}\n", 1)
    return saverules.loads(text)


def train(ckpt: Checkpointer, steps, size: int, total: int | None = None) -> None:
    for s in steps:
        ckpt.step(Progress(s, total), {"w": weights(s, size), "n": s})


def committed(url: str) -> list:
    return DurableTier(url, writer=False).list(verify=True)


# -- SIGKILL during uploads ------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_uploads_and_a_new_node_resumes_from_the_durable_tier_bit_for_bit(s3, tmp_path):
    url = f"s3://{BUCKET}/killed-{secrets.token_hex(4)}"
    size = 500_000  # 2 MB of tensors a checkpoint; the local tier saves every step, the durable tier every third
    rng = random.Random(1818)
    newest = None  # the newest committed durable checkpoint after the last kill
    after: list = []  # every committed durable checkpoint after the last kill
    saw_leftovers = []
    ls_left_them = False
    for trial in range(10):
        node = tmp_path / f"node-{trial}"  # a new node each time: its local directory is empty
        child = subprocess.Popen(
            [sys.executable, CHILD, "run", url, str(node), "--size", str(size), "--wait"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), text=True,
            start_new_session=True)
        try:
            first = child.stdout.readline().split()
            if newest is None:
                assert first == ["fresh"], (first, child.stderr.read() if not first else "")
            else:
                assert first[:4] == ["resumed", "durable", newest.name, str(newest.step)], first
                assert first[4] == digest(weights(newest.step, size)), "the resumed state is not bit for bit"
            assert child.stdout.readline().strip() == "ready"
            # the next writer took over the dead holder's lock and removed the leftovers; nothing committed went
            reader = DurableTier(url, writer=False)
            assert reader.leftovers() == [], (trial, reader.leftovers())
            assert [i.name for i in reader.list()] == [i.name for i in after]
            child.stdin.write("go\n")
            child.stdin.flush()
            # at least one promotion first (after the third step), then a random moment of the uploads
            for line in child.stdout:
                if line.startswith("saved") and "durable" in line:
                    break
            time.sleep(rng.uniform(0.0, 1.5))
        finally:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            for stream in (child.stdin, child.stdout, child.stderr):
                stream.close()
        after = committed(url)
        assert all(i.verified is True for i in after), (trial, [(i.name, i.error) for i in after])
        reader = DurableTier(url, writer=False)
        for info in after:  # never a listed checkpoint without its marker and manifest
            assert reader.fs.exists(f"{reader.prefix(info.name)}/{MARKER}")
            assert reader.fs.exists(f"{reader.prefix(info.name)}/manifest.json")
        left = reader.leftovers()
        saw_leftovers.append(bool(left))
        if left and not ls_left_them:  # a reader lists, and leaves the leftovers to the next writer
            ls = subprocess.run([sys.executable, "-m", "saverules.ls", url], capture_output=True, text=True,
                                env=child_env(), timeout=120)
            assert ls.returncode == 0, ls.stderr
            assert reader.leftovers() == left
            ls_left_them = True
        if after:
            newest = after[-1]
    assert any(saw_leftovers), "no kill landed mid-upload: the trials did not test what they claim"
    assert ls_left_them
    assert newest is not None and newest.step >= 3


# -- the server stops and restarts -------------------------------------------------------------


def test_the_server_stops_mid_upload_training_goes_on_and_the_upload_is_retried(s3, tmp_path, caplog):
    url = f"s3://{BUCKET}/outage-{secrets.token_hex(4)}"
    size = 5_000_000  # 20 MB: the upload is still running when the server stops
    caplog.set_level(logging.WARNING, logger="saverules.store")
    ckpt = Checkpointer(two_tiers(durable_every=4, keep_last=1), dir=tmp_path / "local", durable=url,
                        durable_options=FAST, durable_retries=PATIENT)
    train(ckpt, range(1, 5), size, total=8)
    [awaiting] = [i.path for i in ckpt.list() if i.step == 4]
    s3.stop()  # step 4's upload has just started in the background

    def retried() -> list[str]:
        return [m for m in (r.getMessage() for r in caplog.records) if "retry" in m and "step-00000004" in m]

    try:
        train(ckpt, range(5, 9), size, total=8)  # the training thread never waits for the network
        assert Path(awaiting).is_dir(), "a local checkpoint awaiting upload was deleted"
        assert [i.step for i in ckpt.list()] == [4, 8]  # keep_last = 1, and step 4 is protected
        deadline = time.monotonic() + 60
        while not retried() and time.monotonic() < deadline:  # the upload meets the outage: it retries
            time.sleep(0.1)
        assert retried(), [r.getMessage() for r in caplog.records]
        assert Path(awaiting).is_dir()
    finally:
        s3.start()
    ckpt.close(timeout=300)  # the retries reach the server again: both uploads complete
    assert [(i.step, i.verified) for i in committed(url)] == [(4, True), (8, True)]
    assert not Path(awaiting).exists(), "once uploaded, step 4 is released to the local retention"


@pytest.mark.slow  # the promoter's own whole-upload retries (seconds apart) come on top of the per-object ones
def test_an_upload_whose_retries_are_spent_is_reported_at_a_later_step_and_a_later_promotion_succeeds(
        s3, tmp_path):
    url = f"s3://{BUCKET}/spent-{secrets.token_hex(4)}"
    ckpt = Checkpointer(two_tiers(durable_every=2, keep_last=1), dir=tmp_path / "local", durable=url,
                        durable_options=FAST, durable_retries=Retries(attempts=2, first=0.1, longest=0.1),
                        on_error="warn")
    train(ckpt, [1], 1000)
    s3.stop()
    step = 2
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(ckpt, [step], 1000)  # promoted; its upload fails in the background
            [held] = [i.path for i in ckpt.list() if i.step == 2]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any("step-00000002" in str(w.message) for w in caught):
                time.sleep(0.1)
                step += 1
                train(ckpt, [step], 1000)  # training goes on; the failure comes back at a step
        said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        assert any("step-00000002" in m and "Could not connect" in m for m in said), said
        assert Path(held).is_dir(), "the local copy of a failed upload stays"
    finally:
        s3.start()
    step += 2 - step % 2  # the next promotion, with the server back
    train(ckpt, [step], 1000)
    ckpt.close(timeout=300)
    assert step in [i.step for i in committed(url)]


def test_close_reports_a_final_step_that_did_not_reach_the_durable_tier_and_lets_go_of_the_locks(s3, tmp_path):
    url = f"s3://{BUCKET}/late-{secrets.token_hex(4)}"
    ckpt = Checkpointer(two_tiers(durable_every=4), dir=tmp_path / "local", durable=url, durable_options=FAST)
    train(ckpt, range(1, 5), 5_000_000, total=4)  # the final step: an upload of 20 MB
    with pytest.raises(DurableError, match=r"step 4"):
        ckpt.close(timeout=0.0)
    again = Checkpointer(two_tiers(durable_every=4), dir=tmp_path / "local", durable=url, durable_options=FAST)
    again.close(timeout=300)


# -- a flipped byte ---------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_durable_object_falls_back_to_the_one_before_and_says_why(url, tmp_path):
    size = 10_000
    with Checkpointer(two_tiers(durable_every=2), dir=tmp_path / "a", durable=url) as ckpt:
        train(ckpt, range(1, 5), size)
    tier = DurableTier(url, writer=False)
    *_, previous, newest = tier.list()
    assert (previous.step, newest.step) == (2, 4)
    target = largest_object(tier, newest.name)
    data = bytearray(tier.fs.cat_file(target))
    data[len(data) // 2] ^= 0x01
    tier.fs.pipe_file(target, bytes(data))

    state = {"w": torch.zeros(size), "n": 0}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Checkpointer(two_tiers(durable_every=2), dir=tmp_path / "new-node", durable=url) as fresh:
            resumed = fresh.load_latest(state)
            assert fresh.resumed_from == ("durable", previous.name)
    assert resumed is not None and resumed.step == 2
    assert state["n"] == 2 and torch.equal(state["w"], weights(2, size))
    said = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    assert any(newest.name in m and "digest" in m for m in said), said


def largest_object(tier: DurableTier, name: str) -> str:
    """The largest data object of a durable checkpoint (the tensors), by its full path."""
    found = tier.fs.find(tier.prefix(name), detail=True)
    data = {p: e["size"] for p, e in found.items() if not p.endswith((MARKER, "manifest.json"))}
    return max(data, key=lambda p: data[p])


# -- a second writer -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["s3", "file"])
def test_a_second_writer_process_is_refused_and_named(backend, request, tmp_path):
    if backend == "s3":
        request.getfixturevalue("s3")
        url = f"s3://{BUCKET}/two-{secrets.token_hex(4)}"
    else:
        url = f"file://{tmp_path}/durable"
    holder = subprocess.Popen([sys.executable, CHILD, "hold", url, str(tmp_path / "first")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), text=True,
                              start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        # another node's local directory, the same durable URL
        with pytest.raises(StoreLockedError) as err:
            Checkpointer(two_tiers(), dir=tmp_path / "second", durable=url)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        holder.stdout.close()
        holder.stderr.close()
    said = str(err.value)
    assert f"pid {holder.pid}" in said and socket.gethostname() in said and "since" in said, said
    second = tmp_path / "second"
    assert not second.exists() or not [p for p in second.iterdir() if p.name.startswith("step-")], "nothing saved"


def test_memory_tier_second_writer_in_the_same_process_is_refused(tmp_path):
    url = f"memory://durable-{secrets.token_hex(4)}"  # memory:// is one process's: the second writer is in it
    with Checkpointer(two_tiers(), dir=tmp_path / "first", durable=url):
        with pytest.raises(CheckpointError, match=rf"pid {os.getpid()} on host {socket.gethostname()}"):
            Checkpointer(two_tiers(), dir=tmp_path / "second", durable=url)
    Checkpointer(two_tiers(), dir=tmp_path / "second", durable=url).close()  # let go of at close

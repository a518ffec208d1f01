"""One writer per store: a second writer process is refused at construction, naming the holder;
a lock left by a killed process is taken over; readers never need the lock.

Every second writer here is a real second process.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone

import pytest
import torch
from store_common import EVERY_2, REPO, checkpoint_dirs, policy, run_ls

from saverules import Progress
from saverules.torch import Checkpointer, CheckpointError, StoreLockedError

LOCK = ".saverules.lock"

HOLDER = """
import sys, time
import saverules
from saverules import Progress
from saverules.torch import Checkpointer
ck = Checkpointer(saverules.loads(sys.argv[2]), sys.argv[1])
ck.save(Progress(int(sys.argv[3])), {"w": [float(sys.argv[3])]})
print("locked", flush=True)
sys.stdin.readline()
if sys.argv[4] == "close":
    ck.close()
    print("closed", flush=True)
    sys.stdin.readline()
"""


def env():
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def start_holder(directory, step=2, then="exit"):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), EVERY_2, str(step), then],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env())
    line = proc.stdout.readline()
    assert line.strip() == "locked", line + proc.stderr.read()
    return proc


def stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_a_second_writer_process_is_refused_with_the_holder_named(tmp_path):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    holder = start_holder(tmp_path / "store")
    try:
        with pytest.raises(StoreLockedError) as info:
            Checkpointer(policy(), tmp_path / "store")
        err = info.value
        text = str(err)
        assert f"pid {holder.pid}" in text and socket.gethostname() in text, text
        assert "since" in text and str(tmp_path / "store") in text and "own directory" in text
        assert err.holder["pid"] == holder.pid and err.holder["host"] == socket.gethostname()
        since = datetime.fromisoformat(err.holder["since"])
        assert before <= since <= datetime.now(timezone.utc)
        assert isinstance(err, CheckpointError)
        # The reproduction: a second training process on the same store stops at once
        # (instead of overwriting the first one's checkpoints with a stream of misleading warnings).
        second = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path / "store"), EVERY_2, "4", "exit"],
                                input="\n", capture_output=True, text=True, env=env(), timeout=120)
        assert second.returncode != 0
        assert "StoreLockedError" in second.stderr and f"pid {holder.pid}" in second.stderr
        assert "Warning" not in second.stderr
        # The refused writers wrote nothing: the holder's checkpoint is the only one.
        assert checkpoint_dirs(tmp_path / "store") == ["step-00000002"]
    finally:
        stop(holder)


def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path):
    holder = start_holder(tmp_path / "store")
    dead = holder.pid
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    stale = json.loads((tmp_path / "store" / LOCK).read_text())
    assert stale["pid"] == dead  # the killed writer could not clear it
    ck = Checkpointer(policy(), tmp_path / "store")
    assert ck._store_lock.previous["pid"] == dead
    now = json.loads((tmp_path / "store" / LOCK).read_text())
    assert now["pid"] == os.getpid() and now["host"] == socket.gethostname()
    ck.save(Progress(4), {"w": [4.0]})
    assert checkpoint_dirs(tmp_path / "store") == ["step-00000002", "step-00000004"]
    ck.close()


def test_close_lets_another_process_write(tmp_path):
    holder = start_holder(tmp_path / "store", then="close")
    try:
        with pytest.raises(StoreLockedError):
            Checkpointer(policy(), tmp_path / "store")
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        assert (tmp_path / "store" / LOCK).read_text() == ""  # no stale holder is left to mislead
        ck = Checkpointer(policy(), tmp_path / "store")  # the holder process still runs
        ck.save(Progress(4), {"w": [4.0]})
        ck.close()
    finally:
        stop(holder)


def test_readers_need_no_lock(tmp_path):
    holder = start_holder(tmp_path / "store")
    try:
        reader = Checkpointer(policy(), tmp_path / "store", read_only=True)
        state = {"w": None}
        assert reader.load_latest(state).step == 2 and state["w"] == [2.0]
        assert [i.step for i in reader.list()] == [2]
        with pytest.raises(CheckpointError, match="read_only"):
            reader.save(Progress(3), state)
        listing = run_ls(tmp_path / "store")
        assert listing.returncode == 0 and "step-00000002" in listing.stdout
        assert f"pid {holder.pid}" in listing.stdout  # ls says who writes the store
    finally:
        stop(holder)


def test_checkpointers_of_one_process_share_the_lock(tmp_path):
    a = Checkpointer(policy(), tmp_path)
    b = Checkpointer(policy(), tmp_path)
    a.save(Progress(2), {"w": [2.0]})
    a.close()
    b.save(Progress(4), {"w": [4.0]})  # b still holds the lock for this process
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), EVERY_2, "6", "exit"], input="\n",
                           capture_output=True, text=True, env=env(), timeout=120)
    assert probe.returncode != 0 and "StoreLockedError" in probe.stderr
    b.close()
    probe = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), EVERY_2, "6", "exit"], input="\n",
                           capture_output=True, text=True, env=env(), timeout=120)
    assert probe.returncode == 0, probe.stderr


def test_a_forked_child_does_not_keep_the_lock(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    pid = os.fork()
    if pid == 0:  # a data-loader worker, say: it outlives nothing, but holds no lock either
        time.sleep(30)
        os._exit(0)
    try:
        ck.close()
        other = subprocess.run([sys.executable, "-c", HOLDER, str(tmp_path), EVERY_2, "2", "exit"], input="\n",
                               capture_output=True, text=True, env=env(), timeout=120)
        assert other.returncode == 0, other.stderr
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_only_the_writing_rank_locks(tmp_path, monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    # the ranks compare their policies once (saverules.distributed.agree_on_policy): both hold this one
    monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(slice(None), [obj] * len(out)))
    holder = start_holder(tmp_path / "store")
    try:
        ck = Checkpointer(policy(), tmp_path / "store")  # rank 1 never writes, so it takes no lock
        assert not ck.is_writer and ck._store_lock is None
        assert ck.step(Progress(4, total_steps=4), {"w": [4.0]}).save
        ck.close()
    finally:
        stop(holder)
    assert checkpoint_dirs(tmp_path / "store") == ["step-00000002"]


def test_the_lock_file_is_not_a_checkpoint_and_survives_cleanup(tmp_path):
    ck = Checkpointer(policy(), tmp_path)
    ck.save(Progress(2), {"w": [2.0]})
    Checkpointer(policy(), tmp_path)  # start-up cleanup of the same process leaves the lock alone
    assert (tmp_path / LOCK).is_file()
    assert [i.name for i in ck.list()] == ["step-00000002"]
    ck.close()


COLLECTED = """
import os, sys
import saverules
from saverules.store import lock
from saverules.torch import Checkpointer
policy = saverules.loads(sys.argv[2])
kept = Checkpointer(policy, os.path.join(sys.argv[1], "kept"))
dropped = Checkpointer(policy, os.path.join(sys.argv[1], "dropped"))
with lock._GUARD:  # held, as acquire() and release() hold it when the garbage collector interrupts them
    del dropped    # the last reference: its finalizer lets go of its lock right here, in this thread
print(*sorted(os.path.basename(k) for k in lock._HELD))
"""


def test_a_checkpointer_finalized_while_the_lock_table_is_busy_releases_without_deadlock(tmp_path):
    proc = subprocess.run([sys.executable, "-c", COLLECTED, str(tmp_path), EVERY_2], capture_output=True,
                          text=True, env=env(), timeout=180)  # a deadlock would be a timeout here
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["kept"]
    assert (tmp_path / "dropped" / LOCK).read_text() == ""  # released: the holder is cleared

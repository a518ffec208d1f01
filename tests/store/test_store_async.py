"""Asynchronous saves: the snapshot, one write in flight, and failures reported later."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from store_common import (
    EVERY_1_KEEP_2,
    REPO,
    checkpoint_dirs,
    hidden_entries,
    policy,
    small_state,
)

import saverules.torch as st
from saverules import Progress
from saverules.store import fs as store_fs
from saverules.store import snapshot, writer
from saverules.store import state as store_state
from saverules.torch import (
    Checkpointer,
    CheckpointWarning,
)

# --------------------------------------------------------------------------
# Asynchronous saves
# --------------------------------------------------------------------------


def test_async_save_snapshots_at_the_call(tmp_path):
    state = small_state(1.0)
    with Checkpointer(policy(), tmp_path, async_save=True) as ck:
        ck.step(Progress(2), state)
        with torch.no_grad():  # the loop keeps training while the write is in flight
            state["model"].weight.fill_(9.0)
        state["tensor"].fill_(9.0)
    back = small_state(0.0)
    Checkpointer(policy(), tmp_path).load_latest(back)
    assert torch.equal(back["model"].weight, torch.full((2, 3), 1.0))
    assert torch.equal(back["tensor"], torch.arange(4.0))


def test_async_snapshot_keeps_shared_storage_shared():
    base = torch.arange(8.0)
    snap = snapshot.Snapshot()
    copied = store_state.checked({"a": base[:4], "b": base[2:6], "c": base}, "s", snap)
    snap.finish()  # the copies are made here, before the caller may change the state again
    assert copied["a"].untyped_storage().data_ptr() == copied["c"].untyped_storage().data_ptr()
    assert copied["c"].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    base.zero_()
    assert torch.equal(copied["b"], torch.tensor([2.0, 3.0, 4.0, 5.0]))


def test_a_large_snapshot_is_copied_in_pieces_on_several_threads(monkeypatch):
    monkeypatch.setattr(snapshot, "THREADS", 3)
    monkeypatch.setattr(snapshot, "PARALLEL_MIN", 1 << 20)
    monkeypatch.setattr(snapshot, "PIECE", 1 << 18)
    g = torch.Generator().manual_seed(0)
    state = {"big": torch.randn(1 << 19, generator=g), "odd": torch.randn(12345, generator=g).double(),
             "view": None, "small": torch.arange(3)}
    state["view"] = state["big"][7:1000]
    snap = snapshot.Snapshot()
    copied = store_state.checked(state, "s", snap)
    snap.finish()
    for k in state:
        assert torch.equal(copied[k], state[k]) and copied[k].data_ptr() != state[k].data_ptr(), k
    assert copied["view"].untyped_storage().data_ptr() == copied["big"].untyped_storage().data_ptr()


def test_async_snapshot_reuses_buffers(tmp_path):
    ck = Checkpointer(policy(), tmp_path, async_save=True)
    ck.save(Progress(1), {"t": torch.ones(1000)})
    ck.wait()
    pooled = [b.data_ptr() for bufs in ck._async.pool.values() for b in bufs]
    assert pooled
    ck.save(Progress(2), {"t": torch.full((1000,), 2.0)})
    ck.wait()
    assert [b.data_ptr() for bufs in ck._async.pool.values() for b in bufs] == pooled
    back = {"t": None}
    Checkpointer(policy(), tmp_path).load_latest(back)
    assert torch.equal(back["t"], torch.full((1000,), 2.0))


def test_at_most_one_write_in_flight(tmp_path, monkeypatch):
    active, peak = [0], [0]
    lock = threading.Lock()
    real_write = writer.write_file

    def slow_write(path, producer):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real_write(path, producer)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(writer, "write_file", slow_write)
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, async_save=True)
    t0 = time.perf_counter()
    ck.step(Progress(1), small_state())
    first = time.perf_counter() - t0
    for s in range(2, 5):
        ck.step(Progress(s), small_state(s))
    ck.close()
    assert peak[0] == 1
    assert first < 0.05  # the first call returned before its write finished
    assert checkpoint_dirs(tmp_path) == ["step-00000003", "step-00000004"]


def test_background_failure_surfaces_at_the_next_step(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, async_save=True)
    ck.step(Progress(1), small_state())
    ck.wait()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_fs.fs, "fsync", full)
    ck.step(Progress(2), small_state())
    ck._async.pending.join()
    monkeypatch.undo()
    with pytest.raises(st.CheckpointWriteError, match="No space left") as info:
        ck.step(Progress(3), small_state())
    assert info.value.errno == errno.ENOSPC
    assert checkpoint_dirs(tmp_path) == ["step-00000001"] and hidden_entries(tmp_path) == []
    ck.step(Progress(4), small_state())
    ck.close()
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000004"]


def test_background_failure_warns_with_on_error_warn(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, async_save=True, on_error="warn")

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(store_fs.fs, "mkdir", full)
    ck.step(Progress(1), small_state())
    ck._async.pending.join()
    monkeypatch.undo()
    with pytest.warns(CheckpointWarning, match="No space left"):
        d = ck.step(Progress(2), small_state())
    assert d.save
    ck.close()
    assert checkpoint_dirs(tmp_path) == ["step-00000002"]


def test_close_reports_a_pending_failure(tmp_path, monkeypatch):
    import errno

    ck = Checkpointer(policy(), tmp_path, async_save=True)
    monkeypatch.setattr(store_fs.fs, "rename", lambda a, b: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error", a)))
    ck.save(Progress(1), small_state())
    with pytest.raises(st.CheckpointWriteError, match="I/O error"):
        ck.close()
    ck.close()  # reported once


def test_context_manager_does_not_hide_the_loop_exception(tmp_path, monkeypatch):
    import errno

    monkeypatch.setattr(store_fs.fs, "mkdir", lambda p: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error", p)))
    with pytest.raises(KeyError):
        with pytest.warns(CheckpointWarning, match="I/O error"):
            with Checkpointer(policy(), tmp_path, async_save=True) as ck:
                ck.save(Progress(1), small_state())
                raise KeyError("loop failed")


def test_pending_write_completes_at_interpreter_exit(tmp_path):
    script = f"""
import torch, saverules
from saverules.torch import Checkpointer
ck = Checkpointer(saverules.loads('version = 1'), {str(tmp_path)!r}, async_save=True)
ck.save(saverules.Progress(3), {{"w": torch.ones(300000)}})
# no close(): the atexit hook and the writer thread finish the job
"""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = st.inspect_checkpoint(tmp_path / "step-00000003", tmp_path)
    assert info.verified is True and info.step == 3

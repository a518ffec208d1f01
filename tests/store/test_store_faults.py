"""The checkpoint store under failure: SIGKILL at random instants, corrupted files,
disk-full / read-only / permission errors at every write stage, malicious pickles.

The kill trials use a fork server (tests/helpers/store_fault_child.py) that imports torch
once, so each trial costs a fork instead of a fresh interpreter.  CI runs
``SAVERULES_FAULT_TRIALS`` trials (default 24, spread over sync/async x
tensors/torch/safetensors); set it higher for a longer local run, e.g.
``SAVERULES_FAULT_TRIALS=400 pytest tests/store/test_store_faults.py``.

Read-only and permission errors are injected by making the store's file-system
primitives raise ``OSError(EROFS / EACCES)``: the tests may run as root, where a
``chmod``-ed directory stays writable, so a real read-only directory would not
fail at all.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import store_fault_child as child
import torch
from store_common import EVERY_1_KEEP_2, LOCK_FILE, REPO, checkpoint_dirs, hidden_entries, policy, run_ls

import saverules.torch as st
from saverules import Progress
from saverules.store import fs as store_fs
from saverules.store import writer
from saverules.torch import (
    Checkpointer,
    CheckpointWarning,
    CheckpointWriteError,
    UnsafeCheckpointError,
)

TRIALS = int(os.environ.get("SAVERULES_FAULT_TRIALS", "24"))
MODES = ("sync-tensors", "async-tensors", "sync-torch", "async-torch", "sync-safetensors", "async-safetensors")


def small_state(value: float):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return {"model": model, "tensor": torch.full((5,), value), "value": value}


def assert_state(state, value: float) -> None:
    assert torch.equal(state["model"].weight, torch.full((2, 3), float(value)))
    assert torch.equal(state["model"].bias, torch.full((2,), -float(value)))
    assert torch.equal(state["tensor"], torch.full((5,), float(value)))
    assert state["value"] == value


def fresh_state():
    return small_state(-1.0)


def tree_digest(root: Path) -> dict:
    """{relative path: sha256} of every file under ``root`` but the lock file (which says who holds
    the store, and is cleared when the holder closes it): proves the checkpoints were left untouched."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == LOCK_FILE and Path(dirpath) == Path(root):
                continue
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# --------------------------------------------------------------------------
# SIGKILL at random instants
# --------------------------------------------------------------------------


class ForkServer:
    def __init__(self):
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve().parents[1] / "helpers" / "store_fault_child.py"), "serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, bufsize=1,
        )

    def start(self, directory: Path, seed: int, mode: str, log: Path) -> int:
        self.proc.stdin.write(f"run {directory} {seed} {mode} {log}\n")
        self.proc.stdin.flush()
        word, pid = self.proc.stdout.readline().split()
        assert word == "pid"
        return int(pid)

    def wait(self, pid: int) -> int:
        line = self.proc.stdout.readline().split()
        assert line[:2] == ["exit", str(pid)], line
        return int(line[2])

    def close(self) -> None:
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def fork_server():
    server = ForkServer()
    yield server
    server.close()


def committed_steps(log: Path) -> list:
    if not log.exists():
        return []
    return [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("committed ")]


def wait_for_commits(log: Path, count: int, pid: int, deadline: float) -> None:
    """Wait until the worker reports ``count`` more commits (so the kill lands mid-run, not mid-import)."""
    start = len(committed_steps(log))
    while len(committed_steps(log)) < start + count and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)


def check_store_after_kill(directory: Path, mode: str, last_committed, leftovers: list) -> int:
    """What must hold after any SIGKILL; returns the step resume picks.

    Appends the kinds of hidden entries the kill left (".tmp", ".old", ".del") to ``leftovers``.
    """
    _, fmt = child.parse_mode(mode)
    if not directory.exists():  # killed before the store was even created
        assert last_committed is None
        return 0
    leftovers.extend(name.split("-")[0] for name in hidden_entries(directory))
    # Every visible checkpoint directory is complete: the commit renames only finished ones in.
    for info in st.scan(directory, verify=True):
        assert info.ok, f"a visible checkpoint is damaged after a kill: {info.name}: {info.error}"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # no fallback may be needed
        ck = Checkpointer(child.make_policy(fmt), directory)
    # The constructor removed every temporary directory the killed writer left.
    assert hidden_entries(directory) == [], hidden_entries(directory)
    info = ck.latest()
    if last_committed is None:
        return info.step if info is not None else 0
    assert info is not None, "a committed checkpoint vanished"
    async_save, _ = child.parse_mode(mode)
    # Never older than what was committed before the kill; newer only by the write(s)
    # that were in flight (async: the one being written plus the one it waited for).
    assert last_committed <= info.step <= last_committed + (2 if async_save else 1)
    state = child.make_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        resumed = ck.load_latest(state)
    assert resumed.step == info.step
    child.check(state, info.step)  # every file belongs to the same step
    return info.step


def test_sigkill_at_random_instants_never_loses_a_committed_checkpoint(tmp_path, fork_server):
    rng = random.Random(int(os.environ.get("SAVERULES_FAULT_SEED", "20261127")))
    modes = [MODES[i % len(MODES)] for i in range(TRIALS)]
    last = {mode: None for mode in MODES}
    kills_after_commit = 0
    leftovers: list = []
    for trial, mode in enumerate(modes):
        directory = tmp_path / mode
        log = tmp_path / f"{mode}.log"
        pid = fork_server.start(directory, rng.randrange(1 << 30), mode, log)
        deadline = time.monotonic() + 30
        # Let it commit a few saves first (more on a resumed store, sometimes none at all),
        # then kill it after a random delay that lands anywhere inside a save.
        wait_for_commits(log, rng.choice((0, 1, 2, 3)), pid, deadline)
        time.sleep(rng.random() * 0.03)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        result = fork_server.wait(pid)
        err = Path(str(log) + ".err")
        assert result == signal.SIGKILL, (
            f"trial {trial} ({mode}): the worker ended by itself ({result}):\n"
            + (err.read_text() if err.exists() else "")
        )
        steps = committed_steps(log)
        last_committed = steps[-1] if steps else None
        if last_committed is not None and last[mode] is not None and last_committed > last[mode]:
            kills_after_commit += 1
        picked = check_store_after_kill(directory, mode, last_committed, leftovers)
        assert picked >= (last_committed or 0)
        last[mode] = last_committed
    # The trials really ran a while: several saves were committed in every mode.
    for mode in MODES:
        if modes.count(mode):
            assert last[mode] is not None and last[mode] >= 2, (mode, last[mode])
    assert kills_after_commit >= len(modes) // 3
    # About half the kills land inside a commit (a temporary directory was left behind);
    # the chance that none of 16 or more does is below one in ten thousand.
    if len(modes) >= 16:
        assert ".tmp" in leftovers, leftovers


def test_the_fault_child_resumes_and_checks_what_it_restored(tmp_path):
    """The worker's own resume path (used after every kill) verifies the restored state."""
    directory = tmp_path / "store"
    ck = Checkpointer(child.make_policy("torch"), directory)
    state = child.make_state()
    child.fill(state, 5)
    ck.save(Progress(5), state)
    back = child.make_state()
    assert Checkpointer(child.make_policy("torch"), directory).load_latest(back).step == 5
    child.check(back, 5)
    with pytest.raises(AssertionError, match="step 4"):
        child.check(back, 4)


# --------------------------------------------------------------------------
# Corruption: resume falls back, with a warning that names the reason; ls reports it
# --------------------------------------------------------------------------


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def _truncate(path: Path) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)


def _set_manifest(d: Path, **changes) -> None:
    m = json.loads((d / "manifest.json").read_text())
    m.update(changes)
    (d / "manifest.json").write_text(json.dumps(m))


def _swap_state(d: Path) -> None:
    # A state file from another step with a manifest that matches its hash: the files
    # verify, but they do not belong to the step the manifest names.
    other = d.parent / "step-00000002"
    (d / "state.pt").write_bytes((other / "state.pt").read_bytes())
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["state.pt"] = json.loads((other / "manifest.json").read_text())["files"]["state.pt"]
    (d / "manifest.json").write_text(json.dumps(m))


CORRUPTIONS = {
    "truncated state": (lambda d: _truncate(d / "state.pt"), "truncated"),
    "flipped byte": (lambda d: _flip(d / "state.pt", 200), "digest (damaged)"),
    "flipped last byte": (lambda d: _flip(d / "state.pt", (d / "state.pt").stat().st_size - 1), "digest (damaged)"),
    "state deleted": (lambda d: os.unlink(d / "state.pt"), "state.pt is missing"),
    "manifest deleted": (lambda d: os.unlink(d / "manifest.json"), "manifest.json is missing"),
    "manifest truncated": (lambda d: _truncate(d / "manifest.json"), "manifest.json is damaged"),
    "manifest empty": (lambda d: (d / "manifest.json").write_bytes(b""), "manifest.json is damaged"),
    "manifest binary": (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe\x00"), "manifest.json is damaged"),
    "manifest not an object": (lambda d: (d / "manifest.json").write_text("[1, 2]"), "not a JSON object"),
    "manifest without step": (lambda d: _set_manifest(d, step="three"), "no valid step"),
    "manifest from the future": (lambda d: _set_manifest(d, format_version=99), "newer than this saverules"),
    "manifest with a wrong size": (
        lambda d: _set_manifest(d, files={"state.pt": {"size": 1, "sha256": "0" * 64}}), "truncated"),
    "manifest escaping the directory": (
        lambda d: _set_manifest(d, files={"state.pt": {"size": 1, "sha256": "0" * 64},
                                          "../x": {"size": 1, "sha256": "0" * 64}}), "bad file name"),
    "state of another step": (_swap_state, "holds step 2"),
}


def _three_saves(directory: Path, fmt: str = "torch") -> None:
    ck = Checkpointer(policy(fmt=fmt), directory)
    for s in (1, 2, 3):
        ck.save(Progress(s, time=float(s)), small_state(float(s)))


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_resume_falls_back_past_a_damaged_checkpoint(tmp_path, capsys, kind):
    damage, reason = CORRUPTIONS[kind]
    _three_saves(tmp_path)
    damage(tmp_path / "step-00000003")
    ck = Checkpointer(policy(), tmp_path)
    state = fresh_state()
    with pytest.warns(CheckpointWarning) as record:
        p = ck.load_latest(state)
    text = "\n".join(str(w.message) for w in record)
    assert "step-00000003" in text and reason in text and "falling back" in text
    assert p.step == 2 and p.time == 2.0
    assert_state(state, 2.0)
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000002", "step-00000003"]  # left for inspection

    import saverules.ls

    capsys.readouterr()
    # A state file swapped in with a matching manifest hashes fine: only loading it tells.
    args = [str(tmp_path)] + (["--load"] if kind == "state of another step" else [])
    rc = saverules.ls.main(args)
    out, err = capsys.readouterr()
    assert rc == 1
    assert "FAILED step-00000003" in out and reason in out
    assert "failed verification" in err


def test_latest_skips_a_damaged_checkpoint_too(tmp_path):
    _three_saves(tmp_path)
    _flip(tmp_path / "step-00000003" / "state.pt", 100)
    with pytest.warns(CheckpointWarning, match="step-00000003.*digest"):
        info = Checkpointer(policy(), tmp_path).latest()
    assert info.step == 2 and info.verified is True


@pytest.mark.parametrize("victim", ["state.pt", "model.safetensors"])
def test_safetensors_checkpoints_fall_back_too(tmp_path, victim):
    _three_saves(tmp_path, "safetensors")
    _flip(tmp_path / "step-00000003" / victim, 120)
    state = fresh_state()
    with pytest.warns(CheckpointWarning, match=f"step-00000003.*{victim}"):
        p = Checkpointer(policy(fmt="safetensors"), tmp_path).load_latest(state)
    assert p.step == 2
    assert_state(state, 2.0)


def test_fall_back_over_several_damaged_checkpoints(tmp_path):
    _three_saves(tmp_path)
    _truncate(tmp_path / "step-00000003" / "state.pt")
    os.unlink(tmp_path / "step-00000002" / "manifest.json")
    state = fresh_state()
    with pytest.warns(CheckpointWarning) as record:
        p = Checkpointer(policy(), tmp_path).load_latest(state)
    assert p.step == 1
    assert_state(state, 1.0)
    text = "\n".join(str(w.message) for w in record)
    assert "step-00000003" in text and "step-00000002" in text


def test_nothing_to_resume_when_every_checkpoint_is_damaged(tmp_path):
    _three_saves(tmp_path)
    for s in (1, 2, 3):
        _flip(tmp_path / f"step-{s:08d}" / "state.pt", 64)
    with pytest.warns(CheckpointWarning), pytest.raises(st.NoValidCheckpointError, match="none of them"):
        Checkpointer(policy(), tmp_path).load_latest(fresh_state())
    with pytest.warns(CheckpointWarning) as record:
        assert Checkpointer(policy(), tmp_path).load_latest(fresh_state(), if_none_valid="start_fresh") is None
    assert "starting from scratch" in str(record[-1].message)
    import saverules.ls

    assert saverules.ls.main([str(tmp_path)]) == 1


def test_a_checkpoint_that_hashes_but_does_not_load_is_skipped(tmp_path):
    # The manifest matches a file that is not a torch archive at all.
    _three_saves(tmp_path)
    d = tmp_path / "step-00000003"
    junk = b"not a zip archive" * 10
    (d / "state.pt").write_bytes(junk)
    _set_manifest(d, files={"state.pt": {"size": len(junk), "sha256": hashlib.sha256(junk).hexdigest()}})
    state = fresh_state()
    with pytest.warns(CheckpointWarning, match="step-00000003.*not a torch.save zip archive"):
        assert Checkpointer(policy(), tmp_path).load_latest(state).step == 2
    import saverules.ls

    # The hashes match, but the file is no torch archive: ls says so without loading anything.
    assert saverules.ls.main([str(tmp_path)]) == 1
    assert saverules.ls.main([str(tmp_path), "--load"]) == 1


def test_ls_reports_a_directory_with_files_but_no_manifest(tmp_path, capsys):
    _three_saves(tmp_path)
    os.unlink(tmp_path / "step-00000002" / "manifest.json")
    import saverules.ls

    capsys.readouterr()
    assert saverules.ls.main([str(tmp_path), "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    bad = [c for c in data["checkpoints"] if c["verified"] is False]
    assert [c["name"] for c in bad] == ["step-00000002"] and "missing" in bad[0]["error"]


# --------------------------------------------------------------------------
# Security: no code from a checkpoint ever runs
# --------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a directory: the proof that code from the file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant(d: Path, payload) -> None:
    """Replace the state file with ``payload`` and fix the manifest, as an attacker would."""
    torch.save(payload, d / "state.pt")
    data = (d / "state.pt").read_bytes()
    _set_manifest(d, files={"state.pt": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}})


@pytest.mark.parametrize("where", ["inside the state", "whole file"])
def test_a_malicious_pickle_is_refused_and_never_runs(tmp_path, where):
    store = tmp_path / "store"
    _three_saves(store)
    marker = tmp_path / "pwned"
    d = store / "step-00000003"
    if where == "whole file":
        _plant(d, _Payload(str(marker)))
    else:
        good = torch.load(d / "state.pt", weights_only=True)
        good["values"]["value"] = _Payload(str(marker))
        _plant(d, good)
    # The hashes match; reading the pickle's opcodes (never running them) tells.
    info = st.inspect_checkpoint(d, store)
    assert info.verified is False and info.unsafe and "asks to unpickle" in info.error
    with pytest.raises(UnsafeCheckpointError, match="refused to load .*step-00000003"):
        Checkpointer(policy(), store).load_latest(fresh_state())
    assert not marker.exists()
    if where == "whole file":  # once through `python -m`, to see that no traceback escapes
        proc = run_ls(store, "--load")
        assert proc.returncode == 1 and "refused" in proc.stdout
        assert "Traceback" not in proc.stderr
    else:
        import saverules.ls

        assert saverules.ls.main([str(store), "--load"]) == 1
    assert not marker.exists()


def test_verify_load_refuses_to_commit_an_unsafe_file(tmp_path, monkeypatch):
    # verify="load" loads what it wrote with weights_only=True, as resume will.
    marker = tmp_path / "pwned"
    real_save = torch.save

    def sneaky_save(obj, f, *a, **k):
        obj = dict(obj, values={"x": _Payload(str(marker))})
        return real_save(obj, f, *a, **k)

    ck = Checkpointer(policy(), tmp_path / "store", verify="load")
    ck.save(Progress(1), small_state(1.0))
    monkeypatch.setattr(torch, "save", sneaky_save)
    with pytest.raises(st.CheckpointVerifyError, match="refused"):
        ck.save(Progress(2), small_state(2.0))
    monkeypatch.undo()
    assert not marker.exists()
    assert checkpoint_dirs(tmp_path / "store") == ["step-00000001"]
    assert hidden_entries(tmp_path / "store") == []


# --------------------------------------------------------------------------
# Disk full, read-only, permission denied: injected at every write stage
# --------------------------------------------------------------------------


class Injector:
    """Counts the store's file-system calls and makes call number ``fail_at`` raise."""

    OPS = ("makedirs", "mkdir", "open_write", "write", "fsync", "fsync_dir", "rename", "rmtree")

    def __init__(self, monkeypatch, fail_at=None, code=errno.ENOSPC):
        self.calls = []
        self.fail_at = fail_at
        self.code = code
        real = store_fs.FileSystem()
        for op in self.OPS:
            if op == "write":
                continue
            monkeypatch.setattr(store_fs.fs, op, self._wrap(op, getattr(real, op)))

    def _maybe_fail(self, op, path):
        self.calls.append(op)
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise OSError(self.code, os.strerror(self.code), path)

    def _wrap(self, op, fn):
        injector = self

        if op == "open_write":
            def open_write(path):
                injector._maybe_fail(op, path)
                return _FailingFile(fn(path), injector, path)
            return open_write

        def call(*args):
            injector._maybe_fail(op, args[0] if args and isinstance(args[0], str) else None)
            return fn(*args)
        return call


class _FailingFile:
    """A file whose first ``write`` counts as one file-system call (and may fail)."""

    def __init__(self, f, injector, path):
        self._f, self._injector, self._path, self._first = f, injector, path, True

    def write(self, data):
        if self._first:
            self._first = False
            self._injector._maybe_fail("write", self._path)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def _stages(monkeypatch, tmp_path, fmt, replace):
    """The file-system calls of one save (commit and retention), in order."""
    directory = tmp_path / "count"
    ck = Checkpointer(policy(EVERY_1_KEEP_2, fmt=fmt), directory)
    for s in (1, 2):
        ck.save(Progress(s), small_state(float(s)))
    with monkeypatch.context() as m:
        inj = Injector(m)
        ck.save(Progress(2 if replace else 3), small_state(9.0))
    return inj.calls


@pytest.mark.parametrize("fmt, replace", [("torch", False), ("safetensors", False), ("torch", True)])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_errors_at_every_stage_lose_nothing(tmp_path, monkeypatch, fmt, replace, code):
    stages = _stages(monkeypatch, tmp_path, fmt, replace)
    # The commit writes the files, syncs, renames; then retention renames one aside and removes it.
    assert {"mkdir", "open_write", "write", "fsync", "fsync_dir", "rename"} <= set(stages)
    commit_calls = max(i for i, op in enumerate(stages) if op == "fsync_dir") + 1
    for fail_at in range(1, len(stages) + 1):
        directory = tmp_path / f"at{fail_at}"
        ck = Checkpointer(policy(EVERY_1_KEEP_2, fmt=fmt), directory)
        for s in (1, 2):
            ck.save(Progress(s), small_state(float(s)))
        before = tree_digest(directory)
        new_step = 2 if replace else 3
        with monkeypatch.context() as m:
            Injector(m, fail_at, code)
            if fail_at <= commit_calls:
                with pytest.raises(CheckpointWriteError) as info:
                    ck.save(Progress(new_step), small_state(9.0))
            else:
                with pytest.warns(CheckpointWarning, match="retention|replaced checkpoint"):
                    ck.save(Progress(new_step), small_state(9.0))
        stage = f"{stages[fail_at - 1]} (call {fail_at})"
        if fail_at <= commit_calls:
            err = info.value
            assert err.errno == code, stage
            assert err.path and str(directory) in err.path, stage  # the message names the path
            assert err.path in str(err) and os.strerror(code) in str(err), stage
            assert "older checkpoints are untouched" in str(err), stage
            assert tree_digest(directory) == before, stage  # nothing older changed, nothing new appeared
            assert hidden_entries(directory) == [], stage  # the temporary directory is gone
            state = fresh_state()
            assert Checkpointer(policy(EVERY_1_KEEP_2, fmt=fmt), directory).load_latest(state).step == 2
            assert_state(state, 2.0)
        else:
            # Committed; only retention failed. The new checkpoint is there, and what retention
            # left half-deleted is hidden from resume and cleaned at the next start.
            Checkpointer(policy(EVERY_1_KEEP_2, fmt=fmt), directory)
            assert hidden_entries(directory) == [], stage
            state = fresh_state()
            assert Checkpointer(policy(EVERY_1_KEEP_2, fmt=fmt), directory).load_latest(state).step == new_step
            assert_state(state, 9.0)
        # The same checkpointer saves again once the disk is back.
        ck.save(Progress(new_step + 1), small_state(4.0))
        assert ck.latest().step == new_step + 1


def test_on_error_warn_keeps_training_and_retries_at_the_next_decision(tmp_path, monkeypatch):
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, on_error="warn")
    ck.step(Progress(1), small_state(1.0))
    with monkeypatch.context() as m:
        Injector(m, fail_at=3, code=errno.ENOSPC)
        with pytest.warns(CheckpointWarning, match=f"{tmp_path}.*No space left on device.*training continues"):
            decision = ck.step(Progress(2), small_state(2.0))
    assert decision.save  # the decision stands; the write failed
    assert checkpoint_dirs(tmp_path) == ["step-00000001"] and hidden_entries(tmp_path) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        assert ck.step(Progress(3), small_state(3.0)).save
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000003"]


def test_async_write_error_at_every_stage(tmp_path, monkeypatch):
    stages = _stages(monkeypatch, tmp_path, "torch", False)
    commit_calls = max(i for i, op in enumerate(stages) if op == "fsync_dir") + 1
    for fail_at in range(1, commit_calls + 1):
        directory = tmp_path / f"at{fail_at}"
        ck = Checkpointer(policy(EVERY_1_KEEP_2), directory, async_save=True)
        for s in (1, 2):
            ck.save(Progress(s), small_state(float(s)))
        ck.wait()
        before = tree_digest(directory)
        with monkeypatch.context() as m:
            Injector(m, fail_at, errno.EROFS)
            ck.save(Progress(3), small_state(9.0))  # returns at once; the writer fails
            ck._async.pending.join()
        with pytest.raises(CheckpointWriteError, match="read-only") as info:
            ck.close()
        assert str(directory) in info.value.path
        assert tree_digest(directory) == before and hidden_entries(directory) == []


def test_an_unwritable_store_directory_is_a_clear_error(tmp_path, monkeypatch):
    target = tmp_path / "ro" / "store"

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(store_fs.fs, "makedirs", refuse)
    with pytest.raises(CheckpointWriteError) as info:
        Checkpointer(policy(), target)
    assert str(target) in str(info.value) and "read-only" in str(info.value)
    assert "[storage].dir" in str(info.value)
    # With on_error="warn" the run can start; each save warns until the directory is writable.
    with pytest.warns(CheckpointWarning, match=str(target)):
        ck = Checkpointer(policy(), target, on_error="warn")
    with pytest.warns(CheckpointWarning, match="read-only"):
        ck.save(Progress(1), small_state(1.0))
    monkeypatch.undo()
    ck.save(Progress(2), small_state(2.0))
    assert checkpoint_dirs(target) == ["step-00000002"]


def test_permission_error_message_names_the_path_and_the_fix(tmp_path, monkeypatch):
    ck = Checkpointer(policy(), tmp_path)

    def denied(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(store_fs.fs, "open_write", denied)
    with pytest.raises(CheckpointWriteError) as info:
        ck.save(Progress(1), small_state(1.0))
    text = str(info.value)
    assert "permission denied" in text and "state.pt" in text and str(tmp_path) in text
    assert "Traceback" not in text
    assert hidden_entries(tmp_path) == [] and checkpoint_dirs(tmp_path) == []


# --------------------------------------------------------------------------
# The checkpoint being written asynchronously is never deleted
# --------------------------------------------------------------------------


def test_an_in_flight_async_write_survives_another_store_starting(tmp_path, monkeypatch):
    import threading

    gate, entered = threading.Event(), threading.Event()
    real_write = writer.write_file

    def held_write(path, producer):
        if path.endswith("state.pt"):
            entered.set()
            assert gate.wait(30)
        return real_write(path, producer)

    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path, async_save=True)
    ck.save(Progress(1), small_state(1.0))
    ck.wait()
    monkeypatch.setattr(writer, "write_file", held_write)
    ck.save(Progress(2), small_state(2.0))
    assert entered.wait(30)
    tmp = hidden_entries(tmp_path)
    assert len(tmp) == 1 and tmp[0].startswith(".tmp-step-00000002-")
    # A second store on the same directory (an inspection, a restarted helper) cleans up
    # leftovers at start: the directory being written right now is not one of them.
    other = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    assert hidden_entries(tmp_path) == tmp
    assert other.latest().step == 1
    gate.set()
    ck.close()
    assert checkpoint_dirs(tmp_path) == ["step-00000001", "step-00000002"]
    assert hidden_entries(tmp_path) == []

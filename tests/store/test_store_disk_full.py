"""Real kernel write errors, raised inside torch's and the store's own writers.

No call is patched here.  A full disk is a 20 MiB tmpfs that the test mounts
(the tests run as root in CI); a file-size limit is RLIMIT_FSIZE in a child
process that ignores SIGXFSZ, so the kernel answers EFBIG; a read-only file
system is that tmpfs remounted read-only; permission denied is a directory
without write permission, written by a child that dropped the capability to
override file permissions.  Where a mount is refused (no root), the full-disk
test runs the RLIMIT_FSIZE scenarios instead and says so on the terminal.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from store_common import REPO, checkpoint_dirs, hidden_entries, policy

from saverules import Progress
from saverules.torch import Checkpointer, CheckpointWarning, CheckpointWriteError, recover_errno

CHILD = Path(__file__).resolve().parents[1] / "helpers" / "disk_full_child.py"
SCENARIOS = [f"{mode}:{fmt}" for fmt in ("tensors", "torch", "safetensors") for mode in ("sync", "async", "warn")]


def run_child(root, limit: int, mib: float, scenarios=SCENARIOS, preexec=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(CHILD), str(root), str(limit), str(mib), *scenarios],
        capture_output=True, text=True, env=env, timeout=300, preexec_fn=preexec,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def failure_text(result, attempt):
    """The message a failed save produced: the exception (raise, async) or the warning (warn)."""
    if result["mode"] == "warn":
        assert attempt["raised"] is None, attempt
        assert len(attempt["warnings"]) == 1, attempt
        return attempt["warnings"][0]
    assert attempt["raised"] == "CheckpointWriteError", attempt
    return attempt["message"]


def check_efbig(results, root):
    assert [f"{r['mode']}:{r['format']}" for r in results] == SCENARIOS
    for r in results:
        first, second, third = r["attempts"]
        for failed in (first, second):
            text = failure_text(r, failed)
            assert "File too large" in text and "(EFBIG)" in text, text
            assert "RLIMIT_FSIZE" in text and "Nothing was committed" in text, text
            assert str(root) in text, text
            if r["mode"] != "warn":
                assert failed["errno"] == errno.EFBIG
                assert failed["path"].startswith(str(root))
        assert third["raised"] is None and third["warnings"] == [], third  # the limit is gone: it saves
        assert r["tmp_left"] == []
        assert r["checkpoints"] == [["step-00000003", True]]
        assert r["resumed"] == 3 and r["restored_value"] == 3.0


def test_a_file_size_limit_is_efbig_in_every_mode(tmp_path):
    check_efbig(run_child(tmp_path, 1 << 20, 2.0), tmp_path)


def mount_tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True)
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


class Disk:
    """A 20 MiB tmpfs at ``path``, or (``path`` None) the reason none could be mounted."""

    def __init__(self, path, why, capsys, test):
        self.path, self.why, self._capsys, self._test = path, why, capsys, test

    def fallback(self, instead: str) -> None:
        """Say on the terminal (and as a warning) that this test runs its fallback, and which."""
        message = f"{self._test}: cannot mount a tmpfs ({self.why or 'refused'}); {instead}"
        with self._capsys.disabled():
            print(f"\n{message}", file=sys.stderr)
        warnings.warn(message, stacklevel=2)


@pytest.fixture
def small_disk(tmp_path, capsys, request):
    mnt = tmp_path / "disk"
    ok, why = mount_tmpfs(mnt, "20m")
    if not ok:
        yield Disk(None, why, capsys, request.node.name)
        return
    try:
        yield Disk(mnt, None, capsys, request.node.name)
    finally:
        umount(mnt)


def test_a_full_disk_is_enospc_in_every_mode(tmp_path, small_disk):
    if small_disk.path is None:
        small_disk.fallback("running the same scenarios against a file-size limit (EFBIG) instead")
        (tmp_path / "fallback").mkdir()
        check_efbig(run_child(tmp_path / "fallback", 1 << 20, 2.0), tmp_path / "fallback")
        return
    disk = small_disk.path
    results = run_child(disk, 0, 12.0)
    assert [f"{r['mode']}:{r['format']}" for r in results] == SCENARIOS
    for r in results:
        first, second = r["attempts"]
        # 12 MiB fit into 20; the store then warns, with the numbers, that the next 12 do not (issue 16)
        assert first["raised"] is None and len(first["warnings"]) == 1, first
        assert "MiB free, and the next save needs about 12." in first["warnings"][0], first
        text = failure_text(r, second)  # the second 12 MiB do not
        assert "No space left on device" in text and "(ENOSPC)" in text, text
        assert "the disk is full" in text and str(disk) in text, text
        if r["mode"] != "warn":
            assert second["errno"] == errno.ENOSPC
            assert second["path"].startswith(str(disk))
        assert r["tmp_left"] == []  # the partial write is gone, its space given back
        assert r["checkpoints"] == [["step-00000001", True]]
        assert r["resumed"] == 1 and r["restored_value"] == 1.0


def test_native_writers_that_lose_the_errno_are_read_as_a_full_disk(small_disk, tmp_path):
    """torch.save to a path (its C++ file writer) and safetensors' own writer report a full disk
    without an errno on the exception; recover_errno finds ENOSPC all the same."""
    if small_disk.path is None:
        small_disk.fallback("showing the same recovery against a file-size limit (EFBIG) in a child instead")
        code = (
            "import resource, signal, torch, safetensors.torch as sf, os\n"
            "from saverules.torch import recover_errno\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
            "for n, save in enumerate((lambda p: torch.save({'w': torch.ones(1 << 19)}, p),\n"
            "                          lambda p: sf.save_file({'w': torch.ones(1 << 19)}, p))):\n"
            f"    path = os.path.join({str(tmp_path)!r}, f'big{{n}}')\n"
            "    try: save(path)\n"
            "    except Exception as e: print(recover_errno(e, path))\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert out.stdout.split() == [str(errno.EFBIG)] * 2, out.stdout + out.stderr
        return
    import safetensors.torch as sf

    big = {"w": torch.ones(6 << 20)}  # 24 MiB: more than the whole disk
    for name, save in (("torch.pt", lambda p: torch.save(big, p)), ("sf.safetensors", lambda p: sf.save_file(big, p))):
        target = small_disk.path / name
        with pytest.raises(Exception) as info:
            save(str(target))
        assert getattr(info.value, "errno", None) is None  # the writer's own exception has no errno ...
        assert recover_errno(info.value, str(target)) == errno.ENOSPC, repr(info.value)  # ... recovered here
        if target.exists():
            target.unlink()


def test_a_read_only_file_system_is_erofs(small_disk, tmp_path):
    if small_disk.path is None:
        small_disk.fallback("no read-only file system can be made without one; checking a directory that "
                            "refuses writes (EACCES) instead")
        check_a_directory_that_refuses_writes()
        return
    store = small_disk.path / "store"
    ck = Checkpointer(policy(), store)
    ck.save(Progress(1), {"w": torch.ones(3)})
    ck.close()
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk.path)], capture_output=True).returncode == 0
    with pytest.raises(CheckpointWriteError) as info:
        Checkpointer(policy(), store)
    err = info.value
    assert err.errno == errno.EROFS and "read-only" in str(err) and str(store) in str(err)
    # on_error="warn": the run may start, every save warns; reading needs no write access at all
    with pytest.warns(CheckpointWarning, match="EROFS"):
        ck = Checkpointer(policy(), store, on_error="warn")
    with pytest.warns(CheckpointWarning, match="the file system is read-only"):
        ck.save(Progress(2), {"w": torch.ones(3)})
    state = {"w": None}
    assert Checkpointer(policy(), store, read_only=True).load_latest(state).step == 1
    assert torch.equal(state["w"], torch.ones(3))


def _drop_file_permission_override():
    """In the child, as root: give up CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH for good (then exec)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_permission_denied_is_eacces():
    check_a_directory_that_refuses_writes()


def check_a_directory_that_refuses_writes():
    """A child without the power to override file permissions opens a store in a 0555 directory."""
    base = Path(tempfile.mkdtemp(prefix="saverules-eacces-"))
    try:
        os.chmod(base, 0o555)
        code = (
            "import errno, sys\n"
            "import saverules\n"
            "from saverules.torch import Checkpointer, CheckpointWriteError\n"
            "try:\n"
            "    Checkpointer(saverules.loads('version = 1'), sys.argv[1])\n"
            "except CheckpointWriteError as e:\n"
            "    print(errno.errorcode.get(e.errno), e.path); print(e)\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "-c", code, str(base / "store")], capture_output=True, text=True,
                              env=env, timeout=120, preexec_fn=_drop_file_permission_override)
        first, message = proc.stdout.split("\n", 1)
        assert first.split()[0] == "EACCES", proc.stdout + proc.stderr
        assert str(base) in first and "permission denied" in message and "[storage].dir" in message
        assert checkpoint_dirs(base) == [] and hidden_entries(base) == []
    finally:
        os.chmod(base, 0o755)
        import shutil

        shutil.rmtree(base)

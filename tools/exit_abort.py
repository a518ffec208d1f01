"""Why a process can die at exit with "terminate called without an active exception" (SIGABRT), and what stops it.

    PYTHONPATH=. python tools/exit_abort.py [--runs 5]

Issue 16, item 14. The mechanism, shown by two minimal programs run here:

1. ``op``: a daemon thread is inside a torch operator (pybind11 has released
   the GIL) when the main thread returns. The interpreter starts to finalize;
   when the thread's operator ends, pybind11's guard (a C++ destructor, so
   ``noexcept``) asks for the GIL back. CPython 3.11 answers a thread that
   asks for the GIL during finalization with ``pthread_exit``; the forced
   unwinding reaches the ``noexcept`` destructor and the C++ runtime calls
   ``std::terminate``: the message above, then SIGABRT.
2. ``collective``: the same through gloo, as a sharded save's writer thread
   would meet it: two ranks under torchrun, rank 0's thread waits in a
   collective on a group of its own, rank 1 joins only while rank 0 is
   finalizing (a slow teardown, as on a loaded machine). The collective
   completes, the thread asks for the GIL, and rank 0 aborts.

Rank 1 of ``collective`` has no thread of its own, yet it too aborted in
some runs on the loaded machine: its last collective returns when gloo's worker
(a native thread) has finished the work, not when the worker has dropped it;
the worker drops the work, and the last reference to a tensor made in Python,
a moment later, and that needs the GIL. When rank 1's interpreter is already
finalizing by then, the worker is ended the same way. Any native thread of a
process group alive at finalization can do it.

With ``--fix`` each program registers ``atexit`` handlers, which run while the
interpreter is whole: one waits for the thread, and one destroys the process
groups (which joins gloo's workers). saverules does the same for what it owns:
the Checkpointer's exit handler waits for the write in flight, the hash thread
is ended, and the gloo group of sharded saves is destroyed
(saverules/store/ranks.py). The job's default group belongs to the script.

Hashing threads (hashlib, xxhash) in the same position do not abort: their
frames are C, with nothing ``noexcept`` to stop the unwinding.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OP = """
import atexit, sys, threading, time
import torch

a = torch.randn(600, 600)
started = threading.Event()
stop = []


def work():
    started.set()
    while not stop:
        torch.mm(a, a)  # pybind11 releases the GIL inside, and takes it back in a destructor


thread = threading.Thread(target=work, daemon=True)
thread.start()
started.wait()
if "--fix" in sys.argv:
    atexit.register(lambda: (stop.append(1), thread.join(10)))
time.sleep(0.05)
"""

COLLECTIVE = """
import atexit, sys, threading, time
import torch, torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
group = dist.new_group(backend="gloo")


class SlowTeardown:  # a module global whose teardown takes a while: rank 0 finalizes for 2 s
    def __del__(self):
        time.sleep(2.0)


keep = SlowTeardown()


def collective():
    dist.all_reduce(torch.ones(4), group=group)


if "--fix" in sys.argv:  # registered first, so it runs after the join below: the groups go last
    atexit.register(dist.destroy_process_group)
if rank == 0:
    thread = threading.Thread(target=collective, daemon=True)
    thread.start()
    if "--fix" in sys.argv:
        atexit.register(lambda: thread.join(30))
    time.sleep(0.2)
else:
    time.sleep(1.0)  # joins while rank 0 finalizes
    collective()
"""


def run(code: str, fix: bool, ranks: int) -> tuple[int, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(code)
        args = [str(script)] + (["--fix"] if fix else [])
        if ranks > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                   *args]
        else:
            cmd = [sys.executable, *args]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp)
    out = proc.stdout + proc.stderr
    return proc.returncode, "terminate called without an active exception" in out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print("| program | fix | runs | aborted | exit statuses |")
    print("|---|---|---|---|---|")
    for name, code, ranks in (("op", OP, 1), ("collective", COLLECTIVE, 2)):
        for fix in (False, True):
            results = [run(code, fix, ranks) for _ in range(a.runs)]
            statuses = sorted({rc for rc, _ in results})
            print(f"| {name} | {'yes' if fix else 'no'} | {a.runs} | {sum(ab for _, ab in results)} | "
                  f"{', '.join(map(str, statuses))} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

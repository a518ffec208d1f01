"""Soak: the two-rank HF Trainer run under torchrun, N times, beside a CPU burner; count aborts at exit.

    PYTHONPATH=. python tools/soak_hf_torchrun.py --runs 30 [--burners 1]

Issue 16 item 14: one run ended with ``terminate called without an active
exception`` (SIGABRT) on rank 0 after training finished.  Each run here is the
scenario of tests/integrations/test_transformers.py::
test_torchrun_two_ranks_take_the_same_decisions_and_only_rank_0_writes; a run
counts as an abort when its output says ``terminate called`` or a rank died by
a signal.  Not part of the test suite (it takes minutes).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POLICY = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 40\n[retention]\nkeep_last = 3\n'




def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--burners", type=int, default=1, help="CPU burner processes running beside each run")
    a = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.burners)]
    aborts = failures = 0
    try:
        for i in range(1, a.runs + 1):
            with tempfile.TemporaryDirectory() as tmp:
                pfile = Path(tmp) / "policy.toml"
                pfile.write_text(POLICY)
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(REPO / "tests" / "helpers" / "integ_child.py"), "hf", str(Path(tmp) / "ddp"), str(pfile)]
                t0 = time.monotonic()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
                out = proc.stdout + proc.stderr
                aborted = "terminate called" in out or "Signal 6" in out or "SIGABRT" in out
                aborts += aborted
                failures += proc.returncode != 0
                print(f"run {i}/{a.runs}: exit {proc.returncode}, {'ABORT' if aborted else 'clean'}, "
                      f"{time.monotonic() - t0:.1f} s", flush=True)
                if proc.returncode != 0:
                    print(out[-3000:], flush=True)
    finally:
        for b in burners:
            b.send_signal(signal.SIGKILL)
            b.wait()
    print(f"{a.runs} runs beside {a.burners} CPU burner(s): {aborts} aborts, {failures} non-zero exits")
    return 1 if aborts or failures else 0


if __name__ == "__main__":
    sys.exit(main())

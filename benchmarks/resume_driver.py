"""Runs the reference loop for benchmarks/bench_resume.py and stops it after its first step.

    python -m benchmarks.resume_driver [--bare FILE] -- LOOP ARGUMENTS...

It prints ``first step done at step N`` once the first optimizer step of the run is over, then
ends the process at once.  With ``--bare FILE`` the loop's ``--resume`` restores the model,
optimizer, scheduler and loop state dicts from ``torch.load(FILE, weights_only=True)`` (through
the loop's ``restore`` parameter) instead of the store's ``load_latest``: the bare peer.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.resume_driver")
    ap.add_argument("--bare", help="resume from this torch.save of the state dicts instead of load_latest")
    ap.add_argument("loop", nargs=argparse.REMAINDER, help="the loop's arguments, after --")
    args = ap.parse_args()
    loop_args = args.loop[1:] if args.loop[:1] == ["--"] else args.loop

    from saverules.minimind.train import StepReport
    from saverules.minimind.train import main as train_main

    restore = None
    if args.bare:
        def restore(state: dict[str, Any]) -> None:
            import torch

            sd = torch.load(args.bare, weights_only=True, map_location="cpu")
            for key in ("model", "optimizer", "scheduler", "loop"):
                state[key].load_state_dict(sd[key])

    def after_step(report: StepReport) -> None:
        print(f"first step done at step {report.step}", flush=True)
        sys.stderr.flush()
        os._exit(0)  # the time measured ends here; nothing after the first step matters

    sys.exit(train_main(loop_args, after_step=after_step, restore=restore))


if __name__ == "__main__":
    main()

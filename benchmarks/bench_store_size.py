"""Per-save bookkeeping against the size of the store: one save with 3,000 checkpoints stored vs with 10.

The bookkeeping of a save is what the Checkpointer does after the commit
point: remember the new checkpoint, plan retention, delete what it drops
(``Checkpointer._settle``).  It used to scan and parse every manifest in the
store on every save; the writer now keeps an index of its store in memory
(``saverules/store/index.py``) and plans retention incrementally
(``saverules/store/retain.py``).

Both stores are made the same way: real checkpoints at steps 10, 20, ..., and
the policy ``keep_last = 2, keep_every = 10, keep_best = {loss, n = 2}``, so
that the old ones are all kept and every measured save (at a step that is no
multiple of 10) makes retention delete the one that leaves ``keep_last``.
The two stores' saves are interleaved and repeated; the medians are
compared.  The first save of each Checkpointer builds the index (every
manifest read once) and is reported apart.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from . import Row, interleaved, median

NAME = "store_size"
GOAL_RATIO = 2.0
POLICY = """
version = 1
final = false
[[rules]]
kind = "every_steps"
every = 1
[retention]
keep_last = 2
keep_every = 10
keep_best = { metric = "loss", mode = "min", n = 2 }
"""


def _make_store(root: Path, count: int) -> None:
    """``count`` real checkpoints at steps 10, 20, ... (a small state; no retention while they are made)."""
    import torch

    import saverules
    from saverules import Progress
    from saverules.torch import Checkpointer

    with Checkpointer(saverules.loads("version = 1\nfinal = false"), root, verify="none") as ck:
        for k in range(1, count + 1):
            ck.save(Progress(10 * k, metrics={"loss": 5.0 + k}), {"w": torch.zeros(16)})


class _Timed:
    """A Checkpointer whose bookkeeping after each commit is timed."""

    def __init__(self, root: Path) -> None:
        import torch

        import saverules
        from saverules.torch import Checkpointer

        outer = self
        self.last = 0.0

        class Timing(Checkpointer):
            def _settle(self, job: Any, path: Path, manifest: Any) -> None:
                t0 = time.perf_counter()
                super()._settle(job, path, manifest)
                outer.last = time.perf_counter() - t0

        self.ck = Timing(saverules.loads(POLICY), root)
        self.state = {"w": torch.zeros(16)}
        self.step = 10 * 100_000 + 1

    def save(self) -> float:
        from saverules import Progress

        self.step += 1 if self.step % 10 != 9 else 2  # never a multiple of 10: retention deletes as it goes
        self.ck.save(Progress(self.step, metrics={"loss": 100.0}), self.state)
        return self.last


def run(quick: bool = False) -> list:
    sizes = (10, 300 if quick else 3000)
    repeats = 5 if quick else 40
    with tempfile.TemporaryDirectory(prefix="saverules-store-size-") as tmp:
        stores = {n: Path(tmp) / f"store-{n}" for n in sizes}
        for n, root in stores.items():
            _make_store(root, n)
        timed = {n: _Timed(root) for n, root in stores.items()}
        first = {n: t.save() for n, t in timed.items()}  # builds the index
        samples = interleaved({str(n): timed[n].save for n in sizes}, repeats, warmup=1)
        left = {n: sum(1 for p in root.iterdir() if p.name.startswith("step-")) for n, root in stores.items()}
        for t in timed.values():
            t.ck.close()
    small, big = sizes
    med = {n: median(samples[str(n)]) for n in sizes}
    ratio = med[big] / med[small]
    return [
        Row(NAME, f"bookkeeping of one save, {small} checkpoints stored", med[small] * 1e3, "ms",
            samples=samples[str(small)]),
        Row(NAME, f"bookkeeping of one save, {big:,} checkpoints stored", med[big] * 1e3, "ms", ratio=ratio,
            vs=f"{small} stored", goal=f"<= {GOAL_RATIO:g}x", met=ratio <= GOAL_RATIO, samples=samples[str(big)],
            note=f"index, retention plan and one deletion per save; {left[big]:,} checkpoints left at the end"),
        Row(NAME, f"first save after opening, {big:,} stored (builds the index)", first[big] * 1e3, "ms",
            ratio=first[big] / first[small], vs=f"{small} stored"),
    ]

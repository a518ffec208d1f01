"""A rank that loads its own policy file and makes a synced decider or a store (run under torchrun).

    torchrun --nproc_per_node 2 policy_mismatch_child.py MODE STORE_DIR RANK0.toml RANK1.toml

MODE is ``synced`` (the trainer callbacks' decider), ``store`` or ``dcp`` (a
Checkpointer).  Writes ``agreed`` or ``refused: MESSAGE`` to ``STORE_DIR.rankR``
and exits 0 or 3.
"""
from __future__ import annotations

import sys

import torch.distributed as dist

import saverules
from saverules.distributed import PolicyMismatchError


def main() -> int:
    mode, out, *files = sys.argv[1:]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy = saverules.load(files[rank])
    try:
        if mode == "synced":
            from saverules.store.parts import make_decider

            make_decider(policy, 100, dist.get_world_size(), {"sync_seconds": 1.0, "metrics_synced": True})
        else:
            from saverules.torch import Checkpointer

            Checkpointer(policy, dir=out).close()
    except PolicyMismatchError as exc:
        with open(f"{out}.rank{rank}", "w") as f:
            f.write(f"refused: {exc}")
        dist.destroy_process_group()
        return 3
    with open(f"{out}.rank{rank}", "w") as f:
        f.write("agreed")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Local retention with a protected set (store/retain.py): what is protected stays, and sweep() deletes it once
released; through the Checkpointer, a local checkpoint whose upload is held back survives keep_last."""
from __future__ import annotations

import threading
from pathlib import Path

from store_common import policy
from tier_common import local_steps, memory_url, open_checkpointer, run, tier_policy

from saverules.store.manifest import info_from_manifest, read_manifest
from saverules.store.retain import Retainer
from saverules.store.verify import VerifyCache


def test_a_protected_checkpoint_outlives_retention_until_swept(tmp_path):
    from remote_common import local_checkpoints

    local_checkpoints(tmp_path, steps=(1, 2, 3), size=100)  # written under keep-everything
    held: set[str] = {"step-00000001"}
    keep1 = policy('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 1\n[retention]\nkeep_last = 1\n',
                   fmt="tensors")
    r = Retainer(tmp_path, keep1, VerifyCache(), True, set(), protected=lambda: held)
    newest = tmp_path / "step-00000003"
    r.retain(info_from_manifest(newest, tmp_path, read_manifest(newest), True, None))
    assert local_steps(tmp_path) == [1, 3]  # step 2 dropped; step 1 protected
    held.clear()
    r.sweep()
    assert local_steps(tmp_path) == [3]


def test_a_local_checkpoint_whose_upload_is_held_back_survives_keep_last(tmp_path):
    gate = threading.Event()
    pol = tier_policy(memory_url(), local_every=1, durable_every=2, keep_local=1, keep_durable=None)
    ck = open_checkpointer(pol, tmp_path / "local", 6)
    tier = ck.durable
    assert tier is not None and ck._committer.promoter is not None

    def held_back(path: Path, name: str, on_bytes) -> None:  # the promoter's upload strategy, gated by the test
        assert gate.wait(60)
        tier.upload(path, name, on_bytes=on_bytes)

    ck._committer.promoter.strategy = held_back
    run(ck, range(1, 6), 6)  # step 2 uploads (held), 4 waits; keep_last = 1 drops them locally
    assert local_steps(tmp_path / "local") == [2, 4, 5]
    assert ck._committer.protected() >= {"step-00000002", "step-00000004"}
    gate.set()
    run(ck, range(6, 7), 6)
    ck.close(timeout=60)
    assert local_steps(tmp_path / "local") == [6]  # released and swept
    assert sorted(tier.names()) == ["step-00000002", "step-00000004", "step-00000006"]

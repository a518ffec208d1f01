"""The sharded promotion's protocol (saverules/store/remote/sharded.py) with ranks as threads on ``memory://``.

Each rank is a :class:`ShardedUpload` on its own :class:`DurableTier` (rank 0
the writer, holding the lock; the others opened without it), run in a thread
of its own, coordinating only through the tier's objects, as the ranks of a
job do.  The local checkpoints are committed by the store and their manifests
name a rank for each file, as a dcp checkpoint's do.  The two-process run on
the S3 server is tests/store/test_durable_dcp.py.
"""
from __future__ import annotations

import json
import secrets
import threading
from pathlib import Path

import pytest
import torch
from store_common import policy

from saverules import Progress
from saverules import loads as saverules_loads
from saverules.store.remote import DurableTier, TransferError
from saverules.store.remote.sharded import ABANDON, POINTER, ShardedUpload, files_of
from saverules.torch import Checkpointer


def sharded_checkpoints(root: Path, world: int, steps=(3,)) -> dict[int, Path]:
    """Committed local checkpoints whose files are shared out among ``world`` ranks, by step."""
    pol = policy('version = 1\nfinal = false\n[[rules]]\nkind = "every_steps"\nevery = 1\n', fmt="tensors")
    out = {}
    with Checkpointer(pol, dir=root) as ckpt:
        for s in steps:
            ckpt.save(Progress(s), {"a": torch.arange(1000.0) + s, "b": torch.ones(300) * s, "n": s})
            out[s] = ckpt.list()[-1].path
    for path in out.values():
        m = json.loads((path / "manifest.json").read_text())
        for i, fname in enumerate(sorted(m["files"])):
            m["files"][fname]["rank"] = i % world
        (path / "manifest.json").write_text(json.dumps(m, indent=1, sort_keys=True))
    return out


def url(kind: str = "memory", where: Path | None = None) -> str:
    """A fresh tier: ``memory://`` (the default) or ``file://`` under ``where``."""
    if kind == "file":
        assert where is not None
        return f"file://{where}/tier-{secrets.token_hex(4)}"
    return f"memory://dcp-{secrets.token_hex(4)}/run"


both = pytest.mark.parametrize("kind", ["memory", "file"])


def ranks(address: str, world: int, timeout: float = 10.0) -> list[ShardedUpload]:
    tiers = [DurableTier(address, writer=r == 0) for r in range(world)]
    return [ShardedUpload(t, r, world, timeout) for r, t in enumerate(tiers)]


def in_threads(jobs: dict[int, list[tuple[Path, str]]], uploads: list[ShardedUpload]) -> dict[int, list]:
    """Run each rank's promotions in order in a thread of its own; each rank's outcomes (None or the error)."""
    results: dict[int, list] = {r: [] for r in jobs}

    def rank_main(r: int) -> None:
        for path, name in jobs[r]:
            try:
                uploads[r](path, name)
                results[r].append(None)
            except TransferError as exc:
                results[r].append(str(exc))

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


def test_files_of_gives_each_file_to_the_rank_that_wrote_it_and_orphans_to_rank_0():
    manifest = {"files": {"a": {"rank": 0}, "b": {"rank": 1}, "c": {"rank": 3}, "d": {}}}
    assert sorted(files_of(manifest, 0, 2)) == ["a", "c", "d"]
    assert sorted(files_of(manifest, 1, 2)) == ["b"]
    assert sorted(files_of(manifest, 3, 4)) == ["c"]
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 ranks"):
        ShardedUpload(DurableTier(url(), writer=False), 2, 2, 1.0)


@both
def test_three_ranks_commit_one_checkpoint_and_leave_no_coordination_objects(tmp_path, kind):
    [local] = sharded_checkpoints(tmp_path, 3).values()
    address = url(kind, tmp_path)
    ups = ranks(address, 3)
    got = in_threads({r: [(local, local.name)] for r in range(3)}, ups)
    assert got == {0: [None], 1: [None], 2: [None]}
    tier = ups[0].tier
    [info] = tier.list(verify=True)
    assert info.verified and info.name == local.name
    # the reports are gone once committed; the root pointer is hidden from every listing
    assert sorted(ups[0]._objects(local.name)) == sorted(["COMMITTED", "manifest.json", *json.loads(
        (local / "manifest.json").read_text())["files"]])
    assert tier.fs.exists(f"{tier.root}/{POINTER}") and tier.leftovers() == []
    if kind == "file":  # not even the empty folder of the reports is left
        assert sorted(p.name for p in Path(tier.prefix(local.name)).iterdir()) == sorted(
            ups[0]._objects(local.name))


@both
def test_a_rank_that_never_reports_is_named_when_rank_0_gives_up(tmp_path, kind):
    [local] = sharded_checkpoints(tmp_path, 3).values()
    # rank 2 is gone; rank 0 waits 3 s for the reports, long enough for rank 1's on a loaded machine
    ups = ranks(url(kind, tmp_path), 3, timeout=3.0)
    got = in_threads({0: [(local, local.name)], 1: [(local, local.name)]}, ups)
    assert "rank 2: no report from rank(s) 2 within 3s" in got[0][0], got
    assert "abandoned on every rank: rank 2" in got[1][0]  # rank 1 reads rank 0's abandon object
    tier = ups[0].tier
    assert tier.names() == []
    assert [p.rsplit("/", 2)[-2:] for p in tier.fs.find(tier.prefix(local.name))] == [ABANDON.split("/")]


@both
def test_a_file_of_rank_0_changed_since_its_commit_abandons_and_rank_1_hears_why(tmp_path, kind):
    [local] = sharded_checkpoints(tmp_path, 2).values()
    mine = sorted(files_of(json.loads((local / "manifest.json").read_text()), 0, 2))[0]
    data = bytearray((local / mine).read_bytes())
    data[-1] ^= 0xFF
    (local / mine).write_bytes(bytes(data))
    ups = ranks(url(kind, tmp_path), 2)
    got = in_threads({r: [(local, local.name)] for r in range(2)}, ups)
    for r in (0, 1):
        assert f"abandoned on every rank: rank 0: {local}/{mine} does not match its" in got[r][0], got[r][0]
    assert ups[0].tier.names() == []


@both
def test_a_promotion_rank_0_replaced_is_skipped_by_the_others(tmp_path, kind):
    cps = sharded_checkpoints(tmp_path, 2, steps=(3, 5))
    ups = ranks(url(kind, tmp_path), 2)
    got = in_threads({0: [(cps[5], cps[5].name)],
                      1: [(cps[3], cps[3].name), (cps[5], cps[5].name)]}, ups)
    assert got == {0: [None], 1: [None, None]}
    assert ups[0].tier.names() == [cps[5].name] and ups[0].tier.leftovers() == []


@both
def test_a_promotion_the_other_rank_replaced_is_served_before_its_own(tmp_path, kind):
    cps = sharded_checkpoints(tmp_path, 2, steps=(3, 5))
    ups = ranks(url(kind, tmp_path), 2)
    got = in_threads({0: [(cps[3], cps[3].name), (cps[5], cps[5].name)],
                      1: [(cps[5], cps[5].name)]}, ups)
    assert got == {0: [None, None], 1: [None]}
    assert [i.name for i in ups[0].tier.list(verify=True) if i.verified] == [cps[3].name, cps[5].name]


def test_a_rank_waits_bounded_for_rank_0_to_start(tmp_path):
    [local] = sharded_checkpoints(tmp_path, 2).values()
    ups = ranks(url(), 2, timeout=0.3)
    got = in_threads({1: [(local, local.name)]}, ups)
    assert "rank 1 waited 0.3s (the commit timeout) for rank 0 to start the promotion of step-00000003" in got[1][0]


def test_a_local_directory_that_is_not_a_committed_checkpoint_uploads_nothing(tmp_path):
    ups = ranks(url(), 1)
    (tmp_path / "half").mkdir()
    with pytest.raises(TransferError, match="is not a committed checkpoint"):
        ups[0](tmp_path / "half", "half")
    assert ups[0].tier.fs.find(ups[0].tier.root) == [f"{ups[0].tier.root}/.saverules.lock"]


def test_open_sharded_gives_rank_0_the_lock_and_fails_at_once_on_an_unwritable_tier(tmp_path):
    from saverules.store.ranks import Ranks
    from saverules.store.remote.sharded import open_sharded
    from saverules.torch import CheckpointError

    address = url()
    tier, upload = open_sharded(Ranks(5.0), address)
    assert tier.lock is not None and (upload.rank, upload.world, upload.timeout) == (0, 1, 5.0)
    [local] = sharded_checkpoints(tmp_path / "local", 1).values()
    upload(local, local.name)
    assert tier.names() == [local.name]
    tier.close()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="cannot be written"):
        open_sharded(Ranks(5.0), f"file://{tmp_path}/a-file/run")


def test_a_transient_failure_on_one_rank_is_retried_as_a_whole_by_every_rank_s_promoter(tmp_path):
    """Rank 1's file cannot be read (a directory stands in its place: an OSError the retries do not fix); each
    rank's real Promoter tries the whole promotion again once the abandon is seen, and the file is back."""
    import shutil

    from saverules.store.remote.promote import Promoter, Promotion
    from saverules.store.remote.retry import Retries

    [local] = sharded_checkpoints(tmp_path / "local", 2).values()
    [theirs] = sorted(files_of(json.loads((local / "manifest.json").read_text()), 1, 2))
    shutil.move(str(local / theirs), str(tmp_path / "aside"))
    (local / theirs).mkdir()
    address = url()
    quick = Retries(attempts=2, first=0.01, longest=0.01)
    tiers = [DurableTier(address, writer=r == 0, retries=quick) for r in range(2)]
    promoters = [Promoter(t, ShardedUpload(t, r, 2, 10.0), Retries(attempts=3, first=0.3, longest=0.3))
                 for r, t in enumerate(tiers)]

    def repair() -> None:  # once rank 0 abandoned the first attempt, the file comes back
        for _ in range(2000):
            if tiers[0].fs.exists(f"{tiers[0].prefix(local.name)}/{ABANDON}"):
                (local / theirs).rmdir()
                shutil.move(str(tmp_path / "aside"), str(local / theirs))
                return
            threading.Event().wait(0.005)

    fixer = threading.Thread(target=repair)
    fixer.start()
    for p in promoters:
        p.enqueue(Promotion(name=local.name, step=3, path=local, final=True))
    assert all(p.drain(30, bar=False) for p in promoters)
    fixer.join(10)
    assert [p.failures() for p in promoters] == [[], []]
    assert all(p.reached(local.name) for p in promoters)
    [info] = tiers[0].list(verify=True)
    assert info.verified and tiers[0].leftovers() == []
    for p in promoters:
        p.close()


def test_what_an_earlier_job_left_does_not_mislead_the_ranks_of_this_one(tmp_path):
    [local] = sharded_checkpoints(tmp_path, 2).values()
    address = url()
    tiers = [DurableTier(address, writer=r == 0) for r in range(2)]
    # an earlier job (another run) was promoting a later step when it was killed
    tiers[0].fs.pipe_file(f"{tiers[0].root}/{POINTER}",
                          json.dumps({"attempt": "old", "name": "step-00000099", "step": 99, "run": "before"}).encode())
    ups = [ShardedUpload(t, r, 2, 3.0, run="this-job") for r, t in enumerate(tiers)]
    follower: list = []
    rank1 = threading.Thread(target=lambda: follower.append(ups[1](local, local.name)))
    rank1.start()  # rank 1 looks first, and finds only the earlier job's pointer
    threading.Event().wait(0.5)
    ups[0](local, local.name)
    rank1.join(30)
    assert follower == [None] and tiers[0].names() == [local.name]


def test_a_rank_that_cannot_reach_the_tier_is_named_by_itself_and_by_rank_0(tmp_path):
    from saverules.store.remote.retry import Retries, RetriesExhausted

    [local] = sharded_checkpoints(tmp_path / "local", 2).values()
    (tmp_path / "a-file").write_text("x")
    quick = Retries(attempts=2, first=0.01, longest=0.01)
    good = DurableTier(f"file://{tmp_path}/tier", retries=quick)
    # rank 1 sees the tier through a path that cannot work (a file stands where a folder must be)
    cut_off = DurableTier(f"file://{tmp_path}/a-file/tier", writer=False, retries=quick)
    ups = [ShardedUpload(good, 0, 2, 0.5), ShardedUpload(cut_off, 1, 2, 0.5)]
    errors: dict = {}

    def rank1() -> None:
        try:
            ups[1](local, local.name)
        except RetriesExhausted as exc:
            errors[1] = str(exc)

    t = threading.Thread(target=rank1)
    t.start()
    with pytest.raises(TransferError, match="abandoned on every rank: rank 1: no report from rank"):
        ups[0](local, local.name)
    t.join(30)
    assert errors[1].startswith("saverules: rank 1: read of "), errors
    assert good.names() == []


def test_one_process_dcp_store_resumes_from_the_durable_tier_and_refuses_a_damaged_one(tmp_path):
    """The load side without other ranks: rank 0 fetches, the broadcast is the identity."""
    from saverules.store.remote.sharded import ShardedTieredCommitter
    from saverules.torch import CheckpointWarning, NoValidCheckpointError

    text = ('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 2\n[storage]\nformat = "dcp"\n'
            '[durable]\n[[durable.rules]]\nkind = "every_steps"\nevery = 2\n')
    pol = saverules_loads(text)
    address = url("file", tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with Checkpointer(pol, dir=tmp_path / "a", durable=address) as ckpt:
        assert isinstance(ckpt._committer, ShardedTieredCommitter)
        ckpt.step(Progress(2, total_steps=2), {"model": model})
    fresh = torch.nn.Linear(4, 3)
    with Checkpointer(pol, dir=tmp_path / "b", durable=address) as ckpt:
        assert ckpt.load_latest({"model": fresh}).step == 2
        assert ckpt.resumed_from == ("durable", "step-00000002")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    tier = DurableTier(address, writer=False)
    shard = next(p for p in tier.fs.find(tier.prefix("step-00000002")) if p.endswith(".distcp"))
    data = bytearray(tier.fs.cat_file(shard))
    data[len(data) // 2] ^= 0x01
    tier.fs.pipe_file(shard, bytes(data))
    with Checkpointer(pol, dir=tmp_path / "c", durable=address) as ckpt:
        with pytest.warns(CheckpointWarning, match="skipping durable checkpoint .*step-00000002: .*__0_0.distcp "
                          "does not match its"), pytest.raises(NoValidCheckpointError, match="does not match its"):
            ckpt.load_latest({"model": torch.nn.Linear(4, 3)})
        with pytest.warns(CheckpointWarning) as caught:
            assert ckpt.load_latest({"model": torch.nn.Linear(4, 3)}, if_none_valid="start_fresh") is None
        said = [str(w.message) for w in caught]
        assert any("skipping durable checkpoint" in m for m in said) and any("starting from scratch" in m
                                                                            for m in said), said

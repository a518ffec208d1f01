"""A sharded resume splits the digest pass across the ranks: each file is hashed by exactly one rank (what a
rank reads first by that rank itself), and a damaged file found by any rank fails the checkpoint on every rank,
which fall back together with the reason the finding rank gave."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_dcp import torchrun

from saverules.store.sharded import digests

files_st = st.dictionaries(
    st.one_of(st.from_regex(r"__[0-7]_0\.distcp", fullmatch=True), st.from_regex(r"rank-0000[0-7]\.pt", fullmatch=True),
              st.just(".metadata")),
    st.integers(0, 10**9).map(lambda n: {"size": n, "xxh3_128": "0" * 32}), min_size=1)


@given(files_st, st.integers(1, 8), st.data())
def test_every_file_is_hashed_by_exactly_one_rank_and_the_split_is_balanced(files, size, data):
    own = data.draw(st.lists(st.sampled_from(sorted(files)), unique=True, max_size=2))
    parts = [digests.share(files, r, size) for r in range(size)]  # the split itself
    assert sorted(f for part in parts for f in part) == sorted(files)  # every file once
    loads = [sum(files[f]["size"] for f in part) for part in parts]
    assert max(loads) - min(loads) <= max(e["size"] for e in files.values())  # greedy: at most one file ahead
    for r in range(size):
        mine = digests.share(files, r, size, own)
        assert mine[:len(own)] == own  # what a rank reads first it checks first, itself
        assert sorted(mine) == sorted(set(own) | set(parts[r]))


def test_with_equal_sizes_each_rank_hashes_the_data_file_it_wrote():
    files = {n: {"size": 100, "xxh3_128": "0" * 32} for n in ("__0_0.distcp", "__1_0.distcp")}
    files["rank-00000.pt"] = files["rank-00001.pt"] = files[".metadata"] = {"size": 3, "xxh3_128": "0" * 32}
    own = {r: [f"rank-0000{r}.pt", ".metadata"] for r in (0, 1)}
    assert digests.share(files, 0, 2, own[0]) == ["rank-00000.pt", ".metadata", "__0_0.distcp", "rank-00001.pt"]
    assert digests.share(files, 1, 2, own[1]) == ["rank-00001.pt", ".metadata", "__1_0.distcp", "rank-00000.pt"]
    assert digests.share(files, 0, 2) == ["__0_0.distcp", ".metadata", "rank-00001.pt"]


def test_check_names_the_damaged_file(tmp_path):
    (tmp_path / "a").write_bytes(b"hello")
    import xxhash

    files = {"a": {"size": 5, "xxh3_128": xxhash.xxh3_128(b"hello").hexdigest()}}
    digests.check(tmp_path, files, ["a"])
    (tmp_path / "a").write_bytes(b"hellO")
    with pytest.raises(Exception, match=r"^a does not match its xxh3_128 digest \(damaged\)$"):
        digests.check(tmp_path, files, ["a"])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_damage_in_any_ranks_share_falls_back_on_every_rank_with_its_reason(tmp_path):
    base = tmp_path
    torchrun(2, [{"op": "train", "dir": str(base / "sync"), "last": 8, "every": 4}], base / "first")
    damaged = {"r0data": "__0_0.distcp", "r1rank": "rank-00001.pt", "meta": ".metadata"}
    for name, fname in damaged.items():
        shutil.copytree(base / "sync", base / name)
        _flip(base / name / "step-00000008" / fname)
    plan = [{"op": "load", "dir": str(base / name)} for name in damaged]
    reports = torchrun(2, plan, base / "second")
    for i, fname in enumerate(damaged.values()):
        for rank, report in enumerate(reports):
            assert report["actions"][i]["resumed"] == 4, (fname, rank)  # both ranks fell back together
        warned = reports[0]["actions"][i]["warnings"]
        assert len(warned) == 1 and f"{fname} does not match its " in warned[0] and "falling back" in warned[0], warned

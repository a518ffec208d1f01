"""``[storage].format = "dcp"``: sharded checkpoints from every rank, under torchrun with gloo on the CPU.

tests/helpers/dcp_worker.py is the program every rank runs; each launch below runs
several actions, and the tests check what the ranks reported and what is on
disk.  The launches:

* 2 ranks (FSDP2 ``fully_shard``): 12 steps saving every 4 (sync), then 9
  steps saving every 3 with ``async_save=True``; the full state is gathered
  at the end of the first run;
* 1 process: the 2-rank checkpoint loaded (2 -> 1), and a new 1-process run
  (a plain model) saving at steps 4 and 8;
* 2 ranks: resumes from copies of the first store (the newest checkpoint
  removed, one shard with a flipped byte, one shard cut short), each
  trained on to step 12, and the 1-process checkpoint loaded (1 -> 2);
* 4 ranks: the 2-rank checkpoint loaded (2 -> 4).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, plan: list, out: Path, timeout: float = 240) -> list:
    """Run tests/helpers/dcp_worker.py on ``nproc`` ranks; every rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    plan_path = out / f"plan-{nproc}.json"
    plan_path.write_text(json.dumps(plan))
    env = dict(os.environ, PYTHONPATH=str(ROOT), SAVERULES_TEST_OUT=str(out), OMP_NUM_THREADS="1",
               SAVERULES_COMMIT_TIMEOUT="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / "helpers" / "dcp_worker.py"), str(plan_path)]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def full(out: Path, name: str) -> dict:
    return torch.load(out / f"{name}.pt", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a["model"]) == sorted(b["model"])
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sorted(sa[k]) == sorted(sb[k])
        for j in sa[k]:
            assert torch.equal(sa[k][j], sb[k][j]), (k, j)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dcp")
    first = torchrun(2, [
        {"op": "train", "dir": str(base / "sync"), "last": 12, "every": 4},
        {"op": "gather", "out": "sync12"},
        {"op": "train", "dir": str(base / "async"), "last": 9, "every": 3, "async": True, "verify": "load"},
        {"op": "train", "dir": str(base / "kept"), "last": 12, "every": 3, "keep_last": 2},
    ], base)
    single = torchrun(1, [
        {"op": "load", "dir": str(base / "sync")},
        {"op": "gather", "out": "one12"},
        {"op": "train", "dir": str(base / "single"), "last": 8, "every": 4},
        {"op": "gather", "out": "single8"},
    ], base)
    # copies of the 2-rank store for the resumes: without step 12, with one damaged shard, with one cut short
    for name in ("upto8", "flipped", "truncated"):
        shutil.copytree(base / "sync", base / name)
    shutil.rmtree(base / "upto8" / "step-00000012")
    shard = base / "flipped" / "step-00000012" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with open(base / "truncated" / "step-00000012" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    resumed = torchrun(2, [
        {"op": "train", "dir": str(base / "upto8"), "last": 12, "every": 4, "resume": True},
        {"op": "gather", "out": "resumed12"},
        {"op": "train", "dir": str(base / "flipped"), "last": 12, "every": 4, "resume": True},
        {"op": "gather", "out": "flipped12"},
        {"op": "train", "dir": str(base / "truncated"), "last": 12, "every": 4, "resume": True},
        {"op": "gather", "out": "truncated12"},
        {"op": "load", "dir": str(base / "single")},
        {"op": "gather", "out": "two8"},
        # rank 1's disk fills up: first its rank file cannot be written, then its shards
        {"op": "full_disk", "dir": str(base / "full"), "rank": 1, "limits": [1000, 30000]},
        {"op": "full_disk", "dir": str(base / "full-warn"), "rank": 1, "limits": [30000], "on_error": "warn"},
    ], base)
    return base, first, single, resumed


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _digest(entry: dict, data: bytes) -> tuple:
    """(algorithm, hex digest of ``data``) for a manifest entry, computed independently of the store."""
    import hashlib

    [algo] = [k for k in entry if k not in ("size", "rank")]
    if algo == "sha256":
        return algo, hashlib.sha256(data).hexdigest()
    if algo == "xxh3_128":
        import xxhash

        return algo, xxhash.xxh3_128(data).hexdigest()
    import blake3

    return algo, blake3.blake3(data).hexdigest()


def test_two_fsdp_ranks_save_at_the_policy_steps_with_a_manifest_of_every_shard(runs):
    base, first, _, _ = runs
    for rank, report in enumerate(first):
        sync = report["actions"][0]
        assert sync["saved"] == [4, 8, 12], rank
        # after each save every rank sees exactly the committed checkpoints, and only them
        assert sync["visible"] == [[4], [4, 8], [4, 8, 12]], rank
        assert sync["warnings"] == []
    store = base / "sync"
    assert sorted(p.name for p in store.iterdir()) == [".saverules.lock", "policy.toml", "step-00000004", "step-00000008", "step-00000012"]
    for step in (4, 8, 12):
        path = store / f"step-{step:08d}"
        m = _manifest(path)
        assert m["step"] == step and m["storage_format"] == "dcp" and m["world_size"] == 2
        on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
        assert set(m["files"]) == on_disk
        assert {".metadata", "rank-00000.pt", "rank-00001.pt"} <= on_disk
        assert any(n.startswith("__0_") for n in on_disk) and any(n.startswith("__1_") for n in on_disk)
        for fname, entry in m["files"].items():
            data = (path / fname).read_bytes()
            assert entry["size"] == len(data)
            algo, hexdigest = _digest(entry, data)
            assert entry[algo] == hexdigest, fname
            expected_rank = 1 if fname in ("rank-00001.pt",) or fname.startswith("__1_") else 0
            assert entry["rank"] == expected_rank, fname
        mesh = m["format_metadata"]["sharding"]["meshes"]
        assert mesh[0]["shape"] == [2] and mesh[0]["ranks"] == [0, 1] and mesh[0]["device_type"] == "cpu"
        assert mesh[0]["placements"] == {"S(0)": mesh[0]["tensors"]}  # every parameter and moment sharded on dim 0
        assert mesh[0]["tensors"] == 18  # 6 parameters, each with 2 AdamW moments


def test_async_sharded_writes_complete_and_verify(runs):
    base, first, _, _ = runs
    for report in first:
        action = report["actions"][2]
        assert action["saved"] == [3, 6, 9]
        assert action["visible"] == [[3], [3, 6], [3, 6, 9]]
    from saverules.torch import scan

    infos = scan(base / "async", verify=True)
    assert [(i.step, i.verified, i.format) for i in infos] == [(3, True, "dcp"), (6, True, "dcp"), (9, True, "dcp")]


def test_async_sharded_saves_hold_the_state_at_save_while_training_goes_on(tmp_path):
    """The writer copies the parameters and moments while the next step runs; that step's optimizer waits."""
    reports = torchrun(2, [{"op": "overlap", "dir": str(tmp_path / "ck"), "saves": 3}], tmp_path / "out")
    for report in reports:
        rec = report["actions"][0]
        assert rec["errors"] == [None, None, None]
        assert rec["committed"] == [[1], [1, 2], [1, 2, 3]]
    for step in (1, 2, 3):
        before, loaded = full(tmp_path / "out", f"before-{step}"), full(tmp_path / "out", f"loaded-{step}")
        assert_same_state(loaded, before)


def test_a_change_outside_step_on_one_rank_during_an_async_save_fails_it_on_every_rank(tmp_path):
    reports = torchrun(2, [{"op": "overlap", "dir": str(tmp_path / "ck"), "saves": 4, "mutate_rank": 1}],
                       tmp_path / "out")
    errors = [r["actions"][0]["errors"] for r in reports]
    committed = [r["actions"][0]["committed"] for r in reports]
    assert committed[0] == committed[1]
    done = []
    for step, (err0, err1) in enumerate(zip(*errors), 1):
        assert (err0 is None) == (err1 is None), (step, err0, err1)  # every rank knows the same outcome
        if err0 is None:
            done.append(step)
            # the copy was made before rank 1's change: the checkpoint is the state at save, on every rank
            assert_same_state(full(tmp_path / "out", f"loaded-{step}"), full(tmp_path / "out", f"before-{step}"))
        else:
            for text in (err0, err1):
                assert "rank 1" in text and "changed while the asynchronous save of step" in text, text
                assert "Nothing was committed" in text
        assert committed[0][step - 1] == done  # an abandoned save leaves nothing visible
    assert done != [1, 2, 3, 4], "rank 1 changed its biases in place at once; no save saw it"


def test_retention_runs_on_rank_0_after_each_commit_and_before_any_rank_returns(runs):
    base, first, _, _ = runs
    for report in first:
        action = report["actions"][3]
        assert action["saved"] == [3, 6, 9, 12]
        # every rank sees the store as retention left it, as soon as its save returns
        assert action["visible"] == [[3], [3, 6], [6, 9], [9, 12]]
        assert action["warnings"] == []
    # .saverules holds the removal log: which checkpoints retention deleted (saverules.store.removed)
    assert sorted(p.name for p in (base / "kept").iterdir()) == [
        ".saverules", ".saverules.lock", "policy.toml", "step-00000009", "step-00000012"]


def test_exact_resume_on_the_same_ranks_is_bitwise_and_saves_at_the_same_steps(runs):
    base, _, _, resumed = runs
    for rank, report in enumerate(resumed):
        action = report["actions"][0]
        assert action["resumed"] == 8
        assert action["saved"] == [12]
        assert action["counter"] == {"rank": rank, "seen": 8}  # each rank got its own per-rank object back
        assert action["note"] == f"rank {rank}"                # and its own plain value
        assert action["warnings"] == []
    assert_same_state(full(base, "sync12"), full(base, "resumed12"))


@pytest.mark.parametrize("name, reason", [("flipped", "__1_0.distcp does not match its "),
                                          ("truncated", "__0_0.distcp has 100 bytes, the manifest says")])
def test_a_damaged_shard_is_caught_on_resume_and_every_rank_falls_back(runs, name, reason):
    base, _, _, resumed = runs
    index = 2 if name == "flipped" else 4
    for rank, report in enumerate(resumed):
        action = report["actions"][index]
        assert action["resumed"] == 8, rank   # step 12 is damaged: both ranks load step 8
        assert action["saved"] == [12]
    warned = resumed[0]["actions"][index]["warnings"]
    assert len(warned) == 1 and reason in warned[0] and "falling back" in warned[0]
    assert_same_state(full(base, "sync12"), full(base, f"{name}12"))


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank_and_commits_nothing(runs):
    base, _, _, resumed = runs
    for rank, report in enumerate(resumed):
        action = report["actions"][8]
        assert action["steps"] == [1, 4], rank   # the saves of steps 2 and 3 left nothing
        assert action["hidden"] == []
        for error in action["errors"]:
            assert error is not None, rank
            text = error[0]
            assert "the checkpoint for step" in text and "rank 1:" in text and "File too large" in text, text
            assert "Nothing was committed" in text
    # the rank file failed first (limit 1000 bytes), then a shard (limit 30000 bytes)
    first, second = (e[0] for e in resumed[0]["actions"][8]["errors"])
    assert "rank-00001.pt" in first and "__1_0.distcp" in second, (first, second)
    # on_error="warn": every rank warns, training goes on, and the next save is written
    for rank, report in enumerate(resumed):
        action = report["actions"][9]
        assert action["steps"] == [1, 3], rank
        [warned] = action["errors"]
        assert len(warned) == 1 and warned[0].startswith("warned: saverules: the checkpoint for step 2 was not written")
        assert "rank 1: could not write __1_0.distcp: File too large" in warned[0]
        assert "training continues" in warned[0]


def test_resharding_two_ranks_onto_one_gives_the_gathered_state(runs):
    base, _, single, _ = runs
    action = single[0]["actions"][0]
    assert action["resumed"] == 12
    assert action["counter"] == {"rank": 0, "seen": 12}
    assert_same_state(full(base, "sync12"), full(base, "one12"))


def test_resharding_one_process_onto_two_ranks(runs):
    base, _, single, resumed = runs
    assert single[0]["actions"][2]["saved"] == [4, 8]
    m = _manifest(base / "single" / "step-00000008")
    assert m["world_size"] == 1 and m["format_metadata"]["sharding"]["meshes"] == []  # plain tensors
    for _rank, report in enumerate(resumed):
        action = report["actions"][6]
        assert action["resumed"] == 8
        # a rank the checkpoint did not have starts from rank 0's per-rank values
        assert action["counter"] == {"rank": 0, "seen": 8}
    assert_same_state(full(base, "single8"), full(base, "two8"))


def test_resharding_two_ranks_onto_four(runs, tmp_path):
    base = runs[0]
    reports = torchrun(4, [{"op": "load", "dir": str(base / "sync")}, {"op": "gather", "out": "four12"}], tmp_path)
    assert [r["actions"][0]["resumed"] for r in reports] == [12, 12, 12, 12]
    assert [r["actions"][0]["counter"]["rank"] for r in reports] == [0, 1, 0, 0]
    assert_same_state(full(base, "sync12"), full(tmp_path, "four12"))


def test_export_writes_the_full_model_to_one_safetensors_file(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    from saverules.export import main

    base = runs[0]
    out = tmp_path / "model.safetensors"
    assert main([str(base / "sync" / "step-00000012"), str(out)]) == 0
    said = capsys.readouterr().out
    assert "step 12 (dcp format, written by 2 ranks)" in said and "6 tensors" in said
    got, ref = load_file(str(out)), full(base, "sync12")["model"]
    assert sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref)
    # a store: its newest checkpoint; the optimizer as saved, to a .pt
    opt = tmp_path / "optimizer.pt"
    assert main([str(base / "sync"), str(opt), "--object", "optimizer"]) == 0
    saved = torch.load(opt, weights_only=True)
    assert saved["param_groups"] == full(base, "sync12")["optimizer"]["param_groups"]
    # usage errors: no such directory, a nested state dict for safetensors, no such object
    assert main([str(base / "no-such-store"), str(tmp_path / "x.pt")]) == 2
    assert main([str(base / "sync"), str(tmp_path / "y.safetensors"), "--object", "optimizer"]) == 2
    assert main([str(base / "sync"), str(tmp_path / "z.pt"), "--object", "nothing"]) == 2
    err = capsys.readouterr().err
    assert "has no entry 'nothing'" in err and "export it to a .pt file instead" in err


def test_export_refuses_a_damaged_checkpoint(runs, tmp_path, capsys):
    from saverules.export import main

    base = runs[0]
    bad = tmp_path / "bad"
    shutil.copytree(base / "sync" / "step-00000008", bad)
    with open(bad / "__1_0.distcp", "r+b") as f:
        f.seek(40)
        b = f.read(1)
        f.seek(40)
        f.write(bytes([b[0] ^ 0xFF]))
    assert main([str(bad), str(tmp_path / "m.safetensors")]) == 1
    assert "__1_0.distcp does not match its " in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_ls_lists_sharded_checkpoints_with_their_ranks_and_verifies_every_shard(runs, tmp_path, capsys):
    from saverules.ls import main

    base = runs[0]
    store = tmp_path / "store"
    shutil.copytree(base / "sync", store)
    assert main([str(store)]) == 0
    out = capsys.readouterr().out
    assert "RANKS" in out.splitlines()[1]
    assert sum("2 (dcp)" in line for line in out.splitlines()) == 3
    (store / "step-00000008" / "rank-00001.pt").unlink()
    assert main([str(store), "--json"]) == 1
    listed = json.loads(capsys.readouterr().out)["checkpoints"]
    assert [(c["step"], c["world_size"], c["verified"]) for c in listed] == [(4, 2, True), (8, 2, False), (12, 2, True)]
    assert listed[1]["error"] == "rank-00001.pt is missing"
    assert main([str(store), "--load"]) == 1  # loads every checkpoint unsharded in this process


def test_a_planted_metadata_file_is_refused_unread(runs, tmp_path):
    """DCP reads .metadata with pickle; the store refuses anything in it that is not DCP metadata."""
    from saverules.store.sharded import files as dcp_files
    from saverules.torch import Checkpointer, UnsafeCheckpointError

    base = runs[0]
    store = tmp_path / "store"
    shutil.copytree(base / "single", store)
    path = store / "step-00000008"

    class Planted:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    (path / ".metadata").write_bytes(pickle.dumps(Planted()))
    m = _manifest(path)  # an attacker who can write files can rewrite the manifest too
    data = (path / ".metadata").read_bytes()
    algo, hexdigest = _digest(m["files"][".metadata"], data)
    m["files"][".metadata"].update({"size": len(data), algo: hexdigest})
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(dcp_files.UnsafeMetadata, match="posix.system|os.system"):
        dcp_files.load_metadata(path / ".metadata")
    import saverules

    policy = saverules.loads('version = 1\n[storage]\nformat = "dcp"\n')
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    state = {"model": model, "optimizer": torch.optim.AdamW(model.parameters())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsafeCheckpointError, match="refused to load .*metadata"):
            Checkpointer(policy, dir=store).load_latest(state)
    assert not (tmp_path / "pwned").exists()


def test_the_torchrun_example_of_docs_distributed_md_runs_and_resumes_on_fewer_ranks(tmp_path):
    import re

    text = (ROOT / "docs" / "distributed.md").read_text()
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", text, re.S | re.M) if b.startswith("# sharded.py")]
    assert len(blocks) == 1
    (tmp_path / "sharded.py").write_text(blocks[0])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")

    def launch(n):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "sharded.py"]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout.splitlines()

    assert launch(2)[-1] == "[(30, 2), (40, 2)]"  # what the page says it prints
    shutil.rmtree(tmp_path / "checkpoints" / "step-00000040")
    assert launch(1)[-2:] == ["resumed from step 30 on 1 rank(s)", "[(30, 2), (40, 1)]"]

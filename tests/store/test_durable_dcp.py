"""Sharded (``format = "dcp"``) promotion to a durable tier on moto's S3 server, with two real ranks.

tests/helpers/durable_dcp_child.py runs under torchrun (gloo, CPU); the server
is moto's standalone one on 127.0.0.1, started here, reached by every rank
through ``AWS_ENDPOINT_URL``.  One server and one two-rank launch for the
module:

* two ranks train with a dcp Checkpointer and ``durable=URL``: the durable
  rules promote steps 3 and 6, each rank uploading the files it wrote and
  rank 0 committing, and ``close()`` waits for them; then two ranks, and
  one process, with an empty local directory resume from the durable tier
  alone (the one process resharded from 2 ranks to 1), and the model and
  optimizer equal the saved ones bit for bit;
* rank 1's shard goes bad after the local commit: the promotion is abandoned
  on both ranks, both errors name rank 1, and nothing is visible on the tier
  (after the next writer's clean-up, nothing at all is left).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from s3_server import BUCKET, s3_server

from saverules.store.remote import DurableTier

ROOT = Path(__file__).resolve().parents[2]
CHILD = ROOT / "tests" / "helpers" / "durable_dcp_child.py"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    with s3_server() as srv:
        yield srv


def run(nproc: int, actions: list[tuple[str, Path, str]], out: Path, timeout: float = 300) -> dict[str, list[dict]]:
    """One launch of tests/helpers/durable_dcp_child.py on ``nproc`` ranks running ``actions`` in order;
    every rank's report of each action, by action."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), SAVERULES_TEST_OUT=str(out), OMP_NUM_THREADS="1",
               SAVERULES_COMMIT_TIMEOUT="60")
    args = [str(a) for triple in actions for a in triple]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(CHILD), *args]
    else:
        cmd = [sys.executable, str(CHILD), *args]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {a: [json.loads((out / f"{a}-rank{r}.json").read_text()) for r in range(nproc)] for a, _, _ in actions}


RUN = f"s3://{BUCKET}/dcp-run"
FAULT = f"s3://{BUCKET}/dcp-fault"


@pytest.fixture(scope="module")
def two_ranks(server, tmp_path_factory):
    """One launch of two ranks: the whole runtime (train), a promotion with a bad shard on rank 1 (fault), and a
    resume of both ranks on an empty local directory (resume)."""
    base = tmp_path_factory.mktemp("durable-dcp")
    return base, run(2, [("train", base / "node-a", RUN), ("fault", base / "node-f", FAULT),
                         ("resume", base / "node-c", RUN)], base)


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a["model"]) == sorted(b["model"])
    for k in a["model"]:
        assert a["model"][k].dtype == b["model"][k].dtype
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sorted(sa) == sorted(sb) and sa
    for k in sa:
        assert sorted(sa[k]) == sorted(sb[k])
        for j in sa[k]:
            assert torch.equal(sa[k][j], sb[k][j]), (k, j)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]


def test_two_ranks_promote_through_the_checkpointer_and_an_empty_node_resumes_from_the_durable_tier(two_ranks):
    tmp_path, got = two_ranks
    url = RUN
    reports = got["train"]
    # both ranks took the same decisions, the durable tier's included (steps 3 and 6; 6 is the final step)
    assert reports[0]["decisions"] == reports[1]["decisions"]
    assert [(s, d) for s, save, _r, d in reports[0]["decisions"] if d] == [
        (3, ["every_steps(every=3)"]), (6, ["final", "every_steps(every=3)"])]
    assert reports[0]["local"] == ["step-00000002", "step-00000003", "step-00000004", "step-00000006"]
    tier = DurableTier(url, writer=False)
    # durable retention kept the last one; step 3 was committed, then deleted by it
    [info] = tier.list(verify=True)
    assert (info.name, info.step, info.verified) == ("step-00000006", 6, True), info.error
    local = tmp_path / "node-a" / "step-00000006"
    assert (local / "manifest.json").read_bytes() == tier.fs.cat_file(f"{tier.prefix(info.name)}/manifest.json")
    manifest = json.loads((local / "manifest.json").read_text())
    assert {e["rank"] for e in manifest["files"].values()} == {0, 1}  # both ranks' files, each uploaded by its rank
    assert sorted(tier._objects()[info.name]) == sorted(["COMMITTED", "manifest.json", *manifest["files"]])
    assert tier.leftovers() == [] and not tier.fs.exists(f"{tier.root}/.saverules.lock")

    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    # a new node of two ranks: rank 0 downloaded, both loaded their parts and both say where it came from
    assert [(r["step"], r["resumed_from"]) for r in got["resume"]] == [(6, ["durable", "step-00000006"])] * 2
    assert_same_state(saved, torch.load(tmp_path / "loaded-2.pt", weights_only=True))
    # a new node of one process: resharded from 2 ranks to 1
    [resumed] = run(1, [("resume", tmp_path / "node-b", url)], tmp_path)["resume"]
    assert resumed["step"] == 6 and resumed["resumed_from"] == ["durable", "step-00000006"]
    assert_same_state(saved, torch.load(tmp_path / "loaded-1.pt", weights_only=True))


def test_a_failure_on_rank_1_abandons_the_promotion_on_both_ranks_and_leaves_nothing_visible(two_ranks):
    _, got = two_ranks
    url = FAULT
    reports = got["fault"]
    assert ".metadata" in reports[0]["mine"] and not set(reports[0]["mine"]) & set(reports[1]["mine"])
    flipped = reports[1]["flipped"]
    for r in reports:
        assert r["error"] is not None, r
        assert "was abandoned on every rank: rank 1:" in r["error"], r["error"]
        assert "step-00000003" in r["error"]
    # rank 1 names the file whose digest did not match; rank 0 hands on rank 1's reason
    assert flipped in reports[1]["error"] and "digest" in reports[1]["error"]
    assert flipped in reports[0]["error"]
    reader = DurableTier(url, writer=False)
    assert reader.names() == [] and reader.list() == []
    # what is left is hidden (the abandon object) and the next writer removes it
    assert reader.leftovers() == ["step-00000003"]
    left = reader.fs.find(reader.prefix("step-00000003"))
    assert [p.rsplit("/", 2)[-2:] for p in left] == [[".ranks", "abandon.json"]]
    with DurableTier(url) as writer:
        assert writer.leftovers() == []

"""The trainer callbacks record what their retention deletes in the store's removal log, and `ls` lists it."""
from __future__ import annotations

import json

import pytest
from hf_common import make_trainer
from lightning_common import fit
from store_common import run_ls

import saverules
from saverules.lightning import SaverulesCheckpoint
from saverules.store.removed import read
from saverules.transformers import SaverulesCallback

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:DeprecationWarning")

EVERY_40_KEEP_2 = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 40\n[retention]\nkeep_last = 2\n'


def test_hf_retention_is_recorded_and_listed(tmp_path):
    policy = saverules.loads(EVERY_40_KEEP_2)
    cb = SaverulesCallback(policy)
    make_trainer(tmp_path, [cb], max_steps=130).train()
    assert cb.removed == ["checkpoint-40", "checkpoint-80"]
    entries = read(tmp_path).entries
    assert [(e["name"], e["step"]) for e in entries] == [("checkpoint-40", 40), ("checkpoint-80", 80)]
    assert {e["policy_digest"] for e in entries} == {policy.digest}
    assert {e["why"] for e in entries} == {"no retention rule keeps it (keep_last = 2)"}
    proc = run_ls(tmp_path)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout.split("removed by retention (2):", 1)[1]
    assert "checkpoint-40" in table and "checkpoint-80" in table and "checkpoint-120" not in table
    doc = json.loads(run_ls(tmp_path, "--json").stdout)
    assert [e["name"] for e in doc["removed"]] == ["checkpoint-40", "checkpoint-80"]


def test_lightning_retention_is_recorded(tmp_path):
    d = tmp_path / "ckpts"
    policy = saverules.loads(EVERY_40_KEEP_2)
    fit(tmp_path, [SaverulesCheckpoint(policy, dirpath=d)], max_steps=130)
    entries = read(d).entries
    assert [(e["name"], e["step"]) for e in entries] == [("step-00000040.ckpt", 40), ("step-00000080.ckpt", 80)]
    assert {e["policy_digest"] for e in entries} == {policy.digest}

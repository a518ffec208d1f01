"""The [durable] table: loading, errors with positions, the two-tier simulation against the oracle.

The Hypothesis properties compare :func:`saverules.engine.tiers.simulate_tiers`
with the brute-force two-tier oracle (tests/helpers/oracle.py): each tier's
saves, kept set and largest gap; the final step always reaches the durable
tier; each tier's kept set is its retention of its saves.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import oracle_retain, oracle_tiers
from strategies import metric_functions, two_tier_docs

import saverules
from saverules import Checkpoint, Policy, PolicyError
from saverules.engine.tiers import durable_policy, simulate_tiers

TWO_TIERS = """version = 1
[run]
total_steps = 5000
step_seconds = 0.5
upload_seconds = 600
[[rules]]
kind = "every_steps"
every = 100
[retention]
keep_last = 2
[durable]
dir = "s3://bucket/run1"
options = {anon = false}
[[durable.rules]]
kind = "every_steps"
every = 1000
[durable.retention]
keep_last = 3
"""


def test_the_durable_table_loads_with_its_defaults():
    policy = saverules.loads(TWO_TIERS)
    d = policy.durable
    assert d.dir == "s3://bucket/run1" and d.options == {"anon": False} and d.final is True
    assert [r.every for r in d.rules] == [1000] and d.retention.keep_last == 3
    assert saverules.loads("version = 1\n").durable is None
    view = durable_policy(policy)
    assert view.final and view.rules == d.rules and view.retention == d.retention and view.durable is None


@pytest.mark.parametrize("text, where, message", [
    ("[durable]\noptions = {secret = 'x'}\n", "p.toml:3:1", "durable.options: 'secret' is a credential"),
    ("[durable]\nfinal = 1\n", "p.toml:3:1", "durable.final: expected true or false"),
    ("[[durable.rules]]\nkind = 'every_step'\nevery = 1\n", "p.toml:3:1",
     "durable.rules[0].kind: unknown rule kind 'every_step'; did you mean 'every_steps'?"),
    ("[durable.retention]\nkeep_lst = 2\n", "p.toml:3:1", "durable.retention.keep_lst: unknown key 'keep_lst'"),
    ("[durable]\ndirr = 's3://b'\n", "p.toml:3:1", "durable.dirr: unknown key 'dirr'; did you mean 'dir'?"),
    ("[run]\nupload_seconds = -1\n", "p.toml:3:1", "run.upload_seconds"),
])
def test_a_bad_durable_table_names_file_line_and_key(text, where, message):
    with pytest.raises(PolicyError) as err:
        saverules.loads("version = 1\n" + text, "p.toml")
    assert str(err.value).startswith(f"{where}: error: {message}"), str(err.value)


def test_check_simulates_both_tiers_and_warns_of_the_upload_lag(tmp_path):
    path = tmp_path / "tiers.toml"
    path.write_text(TWO_TIERS)
    out = subprocess.run([sys.executable, "-m", "saverules.check", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert "local    50 saves (5 of them promoted), kept 4,900, 5,000" in out.stdout, out.stdout
    assert "durable  5 saves: 1,000, 2,000, 3,000, 4,000, 5,000; kept 3,000, 4,000, 5,000" in out.stdout
    assert ("a crashed process loses at most 100 steps (50s of training); a lost node loses at most 1,000 steps "
            "(8m20s of training), 18m20s with the upload") in out.stdout
    assert (f"{path}:14:1: warning: durable saves at steps 1,000 and 2,000 come 8m20s apart, but an upload takes "
            "10m") in out.stdout
    doc = json.loads(subprocess.run([sys.executable, "-m", "saverules.check", "--format", "json", str(path)],
                                    capture_output=True, text=True, timeout=120).stdout)["files"][0]
    assert doc["tiers"]["durable"]["kept"] == [3000, 4000, 5000] and doc["tiers"]["upload_lag"] == [1000, 2000]


def test_the_upload_lag_from_checkpoint_size_and_bandwidth():
    text = TWO_TIERS.replace("upload_seconds = 600", 'checkpoint_size = "60GB"\nupload_bandwidth = "100MB"')
    sim = simulate_tiers(saverules.loads(text), 5000, None, 0.5)
    assert sim.upload_seconds == 600.0 and sim.lag_steps == (1000, 2000)
    fast = simulate_tiers(saverules.loads(text.replace('"100MB"', '"1GB"')), 5000, None, 0.5)
    assert fast.upload_seconds == 60.0 and fast.lag_steps is None
    assert fast.node_loss_seconds == 1000 * 0.5 + 60.0


totals = st.integers(1, 400)
seconds = st.none() | st.sampled_from([0.4, 1.0, 3.0])


@settings(max_examples=60, deadline=None)
@given(two_tier_docs(), totals, st.none() | st.integers(1, 50), seconds, metric_functions())
def test_the_two_tier_simulation_equals_the_oracle(doc, total, spe, secs, metrics):
    policy = Policy.model_validate(doc)
    sim = simulate_tiers(policy, total, spe, secs, metrics)
    ref = oracle_tiers(doc, total, spe, secs, metrics)
    assert [s for s, _ in sim.durable.saves] == ref.durable_saves
    assert sim.durable.kept == ref.durable_kept
    assert [s for s, _ in sim.local_saves] == ref.local_saves
    assert sim.local_kept == ref.local_kept
    assert (sim.local_gap_steps, sim.durable_gap_steps) == (ref.local_gap, ref.durable_gap)


@settings(max_examples=60, deadline=None)
@given(two_tier_docs(), totals, st.none() | st.integers(1, 50))
def test_the_final_step_always_reaches_the_durable_tier(doc, total, spe):
    doc["durable"].pop("final", None)  # the default
    sim = simulate_tiers(Policy.model_validate(doc), total, spe)
    assert sim.durable.saves[-1][0] == total and "final" in sim.durable.saves[-1][1]
    assert sim.local_saves[-1][0] == total, "a promotion is a local save too"
    assert total in sim.durable.kept and total in sim.local_kept


@settings(max_examples=60, deadline=None)
@given(two_tier_docs(), totals, st.none() | st.integers(1, 50), metric_functions())
def test_each_tiers_kept_set_is_its_retention_of_its_saves(doc, total, spe, metrics):
    policy = Policy.model_validate(doc)
    sim = simulate_tiers(policy, total, spe, 1.0, metrics)
    view = durable_policy(policy)
    for saves, kept, retention in ((sim.durable.saves, sim.durable.kept, view.retention),
                                   (sim.local_saves, sim.local_kept, policy.retention)):
        checkpoints = [Checkpoint(s, float(s), metrics(s) if metrics else None, s == total and "final" in r) for s, r in saves]
        mask = oracle_retain(retention, checkpoints)
        assert kept == [c.step for c, k in zip(checkpoints, mask) if k]

"""Sharded saves survive a rank that dies (SIGKILL) or hangs (SIGSTOP) at any instant.

tests/helpers/dcp_kill.py runs the trials (two forked gloo ranks sharding a model with
``fully_shard``, saving ``format = "dcp"`` at every step, one of them killed
after a random delay); this test checks every trial's outcome:

* the surviving rank exits on its own with :class:`RankFailure`, a message
  that names the stage and says what to do, within the commit timeout
  (at once for a dead rank: its connection closes; after the timeout for a
  hung one) -- the test itself never waits past a subprocess timeout;
* afterwards, seen from a fresh single process, every listed checkpoint
  verifies, nothing hidden survives the next start, and the newest
  checkpoint loads (resharded from 2 ranks onto 1) and holds exactly the
  state of one step, no older than the last save any rank reported
  committed and at most the save in progress.

``SAVERULES_DCP_KILL_TRIALS=100 pytest tests/store/test_dcp_faults.py`` runs more.
"""
from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("SAVERULES_DCP_KILL_TRIALS", "10"))
TIMEOUT = 5.0  # tests/helpers/dcp_kill.py's commit timeout


def test_a_rank_killed_or_hung_at_random_instants_never_leaves_a_torn_checkpoint(tmp_path):
    seed = int(os.environ.get("SAVERULES_DCP_KILL_SEED", "20261201"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "dcp_kill.py"), str(tmp_path), str(TRIALS), str(seed)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120 + 45 * TRIALS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((tmp_path / "result.json").read_text())
    assert len(results) == TRIALS
    stages = collections.Counter()
    for r in results:
        where = f"trial {r['trial']} ({r['signal']} rank {r['victim']}, async={r['async']})"
        assert "error" not in r, f"{where}: {r['error']}"
        assert not r.get("survivor_hung"), f"{where}: the surviving rank was still running {r['survivor_waited']} s later"
        assert r["survivor_exit"] == 3, f"{where}: the survivor exited with {r['survivor_exit']}"
        limit = TIMEOUT + 10 if r["signal"] == "SIGSTOP" else TIMEOUT
        assert r["survivor_waited"] < limit, f"{where}: the survivor took {r['survivor_waited']} s"
        err = r["survivor_error"]
        assert err.startswith("RankFailure: saverules: rank "), f"{where}: {err}"
        assert "Stop the job and restart it" in err and "did not take part within 5 s" in err, err
        stages[err.split(" could not ", 1)[1].split(" of step")[0]] += 1
        assert r["hidden_after_open"] == [], f"{where}: left {r['hidden_after_open']}"
        assert all(ok for _, _, ok, _ in r["listed"]), f"{where}: {r['listed']}"
        assert r["warnings"] == [], f"{where}: {r['warnings']}"
        loaded = r["loaded"] or 0
        # Reported committed means on disk; the save in progress may have been committed (rank 0 renamed it)
        # just before the kill, but nothing newer.
        assert r["committed_after"] <= loaded <= r["committed_after"] + 1, f"{where}: {r}"
        if r["loaded"] is not None:
            assert r["state_step"] == loaded and r["world_size"] == 2, f"{where}: {r}"
            assert r["weights_match"] and r["exp_avg_match"], f"{where}: the loaded tensors are not step {loaded}'s"
    print(f"{TRIALS} trials; the survivor failed while it tried to: {dict(stages)}")

"""`python -m saverules.ls`: the listing of a store, its JSON, and its errors."""
from __future__ import annotations

import json
import os

from store_common import (
    EVERY_1_KEEP_2,
    policy,
    policy_toml,
    run_ls,
    small_state,
)

from saverules import Progress
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# saverules.ls
# --------------------------------------------------------------------------


def ls_main(capsys, *args):
    import saverules.ls

    capsys.readouterr()
    rc = saverules.ls.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_ls_lists_checkpoints_with_retention_reasons(tmp_path, capsys):
    pol = policy(every=1, final=False, keep_last=2, keep_every=2)
    ck = Checkpointer(pol, tmp_path)
    for s in range(1, 6):
        ck.step(Progress(s, time=60.0 * s), small_state())
    rc, out, err = ls_main(capsys, tmp_path)
    assert rc == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("NAME"))
    for column in ("STEP", "CLOCK", "REASONS", "SIZE", "VERIFIED", "KEPT BY"):
        assert column in header
    rows = {line.split()[0]: line for line in lines if line.startswith("step-")}
    assert set(rows) == {"step-00000002", "step-00000004", "step-00000005"}
    assert rows["step-00000002"].rstrip().endswith("keep_every")
    assert "every_steps(every=1)" in rows["step-00000005"] and " 5m " in rows["step-00000005"]
    assert "newest" in rows["step-00000005"] and "keep_last" in rows["step-00000005"]
    assert all(" yes " in row for row in rows.values())


def test_ls_json_and_explicit_policy(tmp_path, capsys):
    ck = Checkpointer(policy(EVERY_1_KEEP_2), tmp_path)
    for s in range(1, 4):
        ck.step(Progress(s), small_state())
    os.unlink(tmp_path / "policy.toml")
    rc, out, _ = ls_main(capsys, tmp_path, "--json")
    assert rc == 0
    data = json.loads(out)
    assert [c["step"] for c in data["checkpoints"]] == [2, 3]
    assert all(c["kept_by"] is None for c in data["checkpoints"])
    assert any("--policy" in note for note in data["notes"])
    pfile = tmp_path.parent / f"{tmp_path.name}-policy.toml"
    pfile.write_text(policy_toml(1, final=False, keep_last=1))
    data = json.loads(ls_main(capsys, tmp_path, "--json", "--policy", pfile)[1])
    assert [c["kept_by"] for c in data["checkpoints"]] == [[], ["newest", "keep_last"]]


def test_ls_errors_are_clear(tmp_path, capsys):
    # Through `python -m` once, to see that no traceback escapes; the rest in process.
    proc = run_ls(tmp_path / "missing")
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and str(tmp_path / "missing") in proc.stderr
    assert "Traceback" not in proc.stderr
    (tmp_path / "file").write_text("x")
    rc, _, err = ls_main(capsys, tmp_path / "file")
    assert rc == 2 and "not a directory" in err
    rc, _, err = ls_main(capsys, tmp_path, "--policy", tmp_path / "nope.toml")
    assert rc == 2 and "nope.toml" in err and "does not exist" in err
    (tmp_path / "bad.toml").write_text("version = 2\n")
    rc, _, err = ls_main(capsys, tmp_path, "--policy", tmp_path / "bad.toml")
    assert rc == 2 and "bad.toml" in err and "version" in err


def test_ls_on_an_empty_directory(tmp_path, capsys):
    rc, out, _ = ls_main(capsys, tmp_path)
    assert rc == 0
    assert "0 checkpoints" in out

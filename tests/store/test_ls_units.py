"""ls prints sizes and the training clock with the engine's one byte and one duration formatter,
in the units check prints (powers of 1000: "2.35KB"; "3m20s")."""
from __future__ import annotations

import json

from store_common import policy

import saverules.ls
from saverules import Progress
from saverules.engine.quantities import format_bytes, format_seconds
from saverules.store import Checkpointer


def test_ls_prints_sizes_and_clocks_as_check_does(tmp_path, capsys):
    ck = Checkpointer(policy('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 2\n'), tmp_path)
    ck.step(Progress(2, time=200.0), {"w": list(range(2000))})
    ck.close()
    capsys.readouterr()
    assert saverules.ls.main([str(tmp_path), "--json"]) == 0
    size = json.loads(capsys.readouterr().out)["checkpoints"][0]["size"]
    assert saverules.ls.main([str(tmp_path)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step-"))
    assert format_bytes(size) in row.split() and format_bytes(size).endswith("KB")
    assert " 3m20s " in row and format_seconds(200.0) == "3m20s"
    assert "KiB" not in row and "0:03:20" not in row

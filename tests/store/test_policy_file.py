"""The store's policy.toml is rendered by the pure engine (Policy.to_toml) and loads back equal."""
from __future__ import annotations

import saverules
from saverules.store import Checkpointer

TEXT = """version = 1
[[rules]]
kind = "any"
rules = [{kind = "every_steps", every = "10%"}, {kind = "improved", metric = "loss", top = 2}]
[run]
total_steps = 200
[retention]
keep_last = 2
[retention.keep_best]
metric = "loss"
"""


def test_a_policy_without_a_file_is_written_whole_and_loads_back_equal(tmp_path):
    policy = saverules.loads(TEXT)
    Checkpointer(policy, tmp_path)
    written = (tmp_path / "policy.toml").read_text()
    assert written == policy.to_toml()
    assert saverules.load(tmp_path / "policy.toml") == policy  # the rules too, not only retention and storage


def test_a_policy_whose_file_changed_since_is_rendered(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(TEXT)
    policy = saverules.load(path)
    path.write_text(TEXT.replace("keep_last = 2", "keep_last = 5"))
    Checkpointer(policy, tmp_path / "store")
    assert saverules.load(tmp_path / "store" / "policy.toml") == policy

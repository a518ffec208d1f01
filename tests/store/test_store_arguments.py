"""The checkpoint store's arguments: what the Checkpointer accepts and refuses."""
from __future__ import annotations

import pytest
from store_common import (
    checkpoint_dirs,
    policy,
    policy_toml,
    small_state,
)

import saverules
from saverules import Progress
from saverules.torch import (
    Checkpointer,
)

# --------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"verify": "sha"}, "verify must be one of"),
        ({"on_error": "ignore"}, "on_error must be one of"),
        ({"async_save": "yes"}, "async_save must be True or False"),
        ({"run_name": "a/b"}, "run_name"),
        ({"dir": 3}, "dir must be a path"),
        ({"dir": ""}, "dir must not be empty"),
        ({"sync": 5}, "sync must be a mapping of SyncedDecider options"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(tmp_path, kwargs, message):
    kwargs.setdefault("dir", tmp_path)
    with pytest.raises(ValueError, match=message):
        Checkpointer(policy(), **kwargs)


def test_policy_must_be_a_policy_or_a_path(tmp_path):
    with pytest.raises(ValueError, match="saverules.Policy or the path"):
        Checkpointer({"version": 1}, tmp_path)


def test_policy_path_is_loaded_and_its_text_recorded(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(policy_toml(dir="unused"))
    ck = Checkpointer(path, tmp_path / "store")
    assert ck.dir == (tmp_path / "store").resolve()
    assert (tmp_path / "store" / "policy.toml").read_text() == path.read_text()
    assert ck.policy.digest == saverules.load(path).digest


def test_missing_policy_file_is_a_policy_error(tmp_path):
    with pytest.raises(saverules.PolicyError, match="nope.toml"):
        Checkpointer(tmp_path / "nope.toml", tmp_path)


def test_storage_dir_from_the_policy_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ck = Checkpointer(policy(dir="ckpts"))
    assert ck.dir == tmp_path / "ckpts"
    ck.save(Progress(1), small_state())
    assert checkpoint_dirs(tmp_path / "ckpts") == ["step-00000001"]


def test_generated_policy_file_reloads_with_the_same_retention(tmp_path):
    pol = policy(keep_last=3, keep_every=10, keep_best={"metric": "loss", "mode": "min", "n": 2})
    Checkpointer(pol, tmp_path)
    again = saverules.load(tmp_path / "policy.toml")
    assert again.retention == pol.retention
    assert again.storage == pol.storage

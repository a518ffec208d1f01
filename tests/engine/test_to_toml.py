"""Policy.to_toml() renders a policy as TOML that loads back to an equal policy.

Property: load(to_toml(p)) == p over the project's policy strategies, for
policies validated from data and for policies loaded from their own TOML text;
equal policies keep the same digest and the same reason string for every rule.
"""
from __future__ import annotations

import pytest
import tomllib
from hypothesis import given
from hypothesis import strategies as st
from strategies import durations, policy_docs, step_policy_docs, to_toml

from saverules import Policy, loads
from saverules.engine.rules import describe

run_costs = st.fixed_dictionaries(
    {},
    optional={
        "save_seconds": st.floats(0.01, 100, allow_nan=False),
        "mtbf": durations,
        "restart_seconds": st.floats(0, 600, allow_nan=False),
        "checkpoint_size": st.sampled_from(["14MB", "2GiB", "1.5TB", "123456B"]),
    },
)


def _assert_round_trip(policy: Policy) -> None:
    text = policy.to_toml()
    back = loads(text, "<to_toml>")
    assert back == policy
    assert back.digest == policy.digest
    assert [describe(r) for r in back.rules] == [describe(r) for r in policy.rules]
    assert back.to_toml().splitlines()[2:] == text.splitlines()[2:]  # (the header names the source)


@given(policy_docs(run=True) | step_policy_docs() | policy_docs(with_shares=False, sparse=True))
def test_a_validated_policy_round_trips_through_to_toml(doc):
    _assert_round_trip(Policy.model_validate(doc))


@given(policy_docs(run=True), run_costs)
def test_a_loaded_policy_round_trips_through_to_toml(doc, costs):
    if costs:
        doc = {**doc, "run": {**doc.get("run", {}), **costs}}
    policy = loads(to_toml(doc), "<strategy>")
    _assert_round_trip(policy)


def test_a_policy_with_odd_strings_round_trips():
    policy = Policy.model_validate({
        "version": 1,
        "rules": [{"kind": "improved", "metric": 'va"l\\loss\u00e9\x7f\x01'}],
        "storage": {"dir": "ckpt dir/\u00fc", "name": "s-{step}"},
    })
    _assert_round_trip(policy)


def test_to_toml_is_what_a_person_writes():
    policy = loads('version = 1\n[[rules]]\nkind = "every_steps"\nevery = "5%"\n'
                   '[[rules]]\nkind = "all"\nrules = [{kind = "on_signal"}, {kind = "window", after = 10}]\n'
                   '[retention]\nkeep_last = 2\n[retention.keep_best]\nmetric = "loss"\n', "p.toml")
    text = policy.to_toml()
    assert text.startswith("# saverules policy (from p.toml)\n# digest: " + policy.digest + "\nversion = 1\n")
    assert '[[rules]]\nkind = "every_steps"\nevery = "5%"\n' in text
    assert 'rules = [{kind = "on_signal"}, {kind = "window", after = 10}]' in text
    assert "[retention]\nkeep_last = 2\n\n[retention.keep_best]\nmetric = \"loss\"\n" in text
    assert "final" not in text and "[storage]" not in text  # only what was written
    assert tomllib.loads(text)["rules"][0] == {"kind": "every_steps", "every": "5%"}


def test_policies_loaded_from_different_sources_are_equal_and_changed_ones_are_not():
    text = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n'
    assert loads(text, "a.toml") == loads(text, "b.toml")
    assert loads(text) != loads(text.replace("10", "11"))
    # writing a default makes another policy: its reason strings differ
    written = loads(text.replace("every = 10", "every = 10\nafter = 0"))
    assert written != loads(text) and hash(loads(text)) == hash(loads(text, "c.toml"))
    with pytest.raises(AssertionError):
        assert describe(written.rules[0]) == describe(loads(text).rules[0])

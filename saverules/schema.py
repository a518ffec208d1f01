"""The JSON Schema of the policy format, for editors.

    python -m saverules.schema > rules/schema.json

TOML editor extensions (Even Better TOML / taplo) validate and complete a file
that starts with a ``#:schema ./schema.json`` comment.  The schema describes
types and shapes; ``python -m saverules.check`` remains the authority (it also
knows, for example, that ``until`` must come after ``after``).
"""
from __future__ import annotations

import json
import sys

from .engine.policy import Policy


def policy_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a version-1 policy document."""
    schema = Policy.model_json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "saverules policy, version 1",
        **schema,
    }


def render() -> str:
    return json.dumps(policy_schema(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())

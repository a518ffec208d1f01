"""Hypothesis profiles for the engine's property tests.

``HYPOTHESIS_PROFILE=default`` (the default) keeps CI fast on two cores;
``HYPOTHESIS_PROFILE=thorough`` runs every property with 2000 or more examples
and no deadline, for a local run before a release.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "default",
    max_examples=60,
    deadline=None,  # shared CI machines: time limits would only make the suite flaky
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough",
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# The shared helpers (oracle, strategies, subprocess children) live in tests/helpers/.
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

_HELPERS = str(Path(__file__).resolve().parent / "helpers")
if _HELPERS not in sys.path:
    sys.path.insert(0, _HELPERS)


# The fixtures of the durable-tier tests, shared by tests/store and tests/train.
import secrets  # noqa: E402

import pytest  # noqa: E402
from s3_server import BUCKET, s3_server  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    """moto's standalone S3 server on 127.0.0.1, one per test module (tests/helpers/s3_server.py)."""
    with s3_server() as server:
        yield server


@pytest.fixture(params=["s3", "file", "memory"])
def url(request, tmp_path):
    """A fresh durable tier's URL on each backend: the S3 server, a local file system, fsspec's memory."""
    tag = secrets.token_hex(4)
    if request.param == "s3":
        request.getfixturevalue("s3")
        return f"s3://{BUCKET}/run-{tag}"
    if request.param == "file":
        return f"file://{tmp_path}/durable"
    return f"memory://durable-{tag}"

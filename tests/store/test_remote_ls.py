"""``python -m saverules.ls URL`` lists a durable tier on moto's S3 server: committed checkpoints only,
verified object by object, with the retention of ``[durable]`` and the lock's holder."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

from remote_common import local_checkpoints
from s3_server import BUCKET
from store_common import REPO

from saverules.store.remote import MARKER, DurableTier

POLICY = """version = 1
[[rules]]
kind = "every_steps"
every = 1
[durable]
[[durable.rules]]
kind = "every_steps"
every = 2
[durable.retention]
keep_last = 2
"""


def _ls(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "saverules.ls", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_ls_lists_a_durable_tier_verifies_it_and_names_the_damage(s3, tmp_path):
    url = f"s3://{BUCKET}/ls-{secrets.token_hex(4)}"
    local = local_checkpoints(tmp_path / "local", steps=(1, 2, 3), size=1000)
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    with DurableTier(url) as tier:
        for path in local:
            tier.upload(path)
        tier.fs.rm_file(f"{tier.prefix(local[2].name)}/{MARKER}")  # an unfinished upload
        out = _ls(url, "--policy", str(policy))
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"{url}: 2 checkpoints\n"), out.stdout
        assert f"written by pid {os.getpid()} on host" in out.stdout
        assert "1 unfinished upload(s) without a commit marker, not listed (step-00000003)" in out.stderr
        doc = json.loads(_ls(url, "--json", "--policy", str(policy)).stdout)
        assert [(c["step"], c["verified"], c["kept_by"]) for c in doc["checkpoints"]] == [
            (1, True, ["keep_last"]), (2, True, ["newest", "keep_last"])]
        obj = f"{tier.prefix(local[0].name)}/tensors.safetensors"
        data = bytearray(tier.fs.cat_file(obj))
        data[-1] ^= 0xFF
        tier.fs.pipe_file(obj, bytes(data))
    out = _ls(url)
    assert out.returncode == 1
    assert "FAILED step-00000001: tensors.safetensors does not match its xxh3_128 digest (damaged)" in out.stdout


def test_ls_of_an_unreachable_tier_is_a_usage_error(s3):
    out = _ls("gcsx://nowhere/run")
    assert out.returncode == 2 and out.stderr.startswith("saverules.ls: error: ") and "Traceback" not in out.stderr

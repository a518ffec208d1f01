"""`python -m saverules.ls` and resume agree: "verified" means load_latest would load it.

Each damage below leaves a manifest whose hashes match the files (as an
attacker, or a confused copy, would), so only a structural check of the
files tells.  For every case ls and load_latest must give the same verdict.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from store_common import REPO, policy, run_ls

from saverules import Progress
from saverules.torch import (
    ALLOWED_GLOBALS,
    Checkpointer,
    CheckpointWarning,
    UnsafeCheckpointError,
    inspect_checkpoint,
    rng_state,
)


def small_state(value: float):
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(value)
        model.bias.fill_(-value)
    return {"model": model, "value": value}


def three_saves(directory: Path, fmt: str = "torch") -> None:
    ck = Checkpointer(policy(fmt=fmt), directory)
    for s in (1, 2, 3):
        ck.save(Progress(s, time=float(s)), small_state(float(s)))
    ck.close()


def rehash(d: Path, name: str = "state.pt") -> None:
    """Make the manifest match whatever ``name`` now holds."""
    m = json.loads((d / "manifest.json").read_text())
    data = (d / name).read_bytes()
    m["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(m))


class Planted:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"mkdir {self.marker}",))


def empty_state(d: Path, _):
    (d / "state.pt").write_bytes(b"")
    rehash(d)


def other_step(d: Path, _):
    (d / "state.pt").write_bytes((d.parent / "step-00000002" / "state.pt").read_bytes())
    rehash(d)


def posix_system(d: Path, marker):
    good = torch.load(d / "state.pt", weights_only=True)
    good["values"]["value"] = Planted(marker)
    torch.save(good, d / "state.pt")
    rehash(d)


def protocol_4_global(d: Path, marker):  # STACK_GLOBAL instead of GLOBAL
    good = torch.load(d / "state.pt", weights_only=True)
    good["values"]["value"] = Planted(marker)
    torch.save(good, d / "state.pt", pickle_protocol=4)
    rehash(d)


def not_a_saverules_file(d: Path, _):
    torch.save({"weights": torch.ones(2)}, d / "state.pt")
    rehash(d)


def missing_tensor_record(d: Path, _):
    src = (d / "state.pt").read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(src)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            if "/data/" not in item.filename or not item.filename.endswith("/0"):
                zout.writestr(item, zin.read(item.filename))
    (d / "state.pt").write_bytes(out.getvalue())
    rehash(d)


def plain_pickle(d: Path, marker):  # the legacy (non-zip) format: torch.load would unpickle it directly
    (d / "state.pt").write_bytes(pickle.dumps(Planted(marker)))
    rehash(d)


DAMAGE = {
    "0-byte state.pt": (empty_state, "damaged", "not a torch.save zip archive"),
    "state.pt of another step": (other_step, "damaged", "holds step 2, the manifest says 3"),
    "archive asking for posix.system": (posix_system, "unsafe", "posix.system"),
    "protocol 4 STACK_GLOBAL": (protocol_4_global, "unsafe", "posix.system"),
    "a torch file that is not a saverules state": (not_a_saverules_file, "damaged", "not a saverules state file"),
    "a tensor record missing": (missing_tensor_record, "damaged", "lacks the tensor data record"),
    "a plain pickle": (plain_pickle, "damaged", "not a torch.save zip archive"),
}


def ls_json(directory, *extra):
    proc = run_ls(directory, "--json", *extra)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_ls_and_resume_agree_on_a_newest_checkpoint_whose_hashes_match(tmp_path, kind):
    damage, verdict, reason = DAMAGE[kind]
    store = tmp_path / "store"
    marker = tmp_path / "pwned"
    three_saves(store)
    damage(store / "step-00000003", marker)

    rc, data = ls_json(store)
    newest = data["checkpoints"][-1]
    assert newest["name"] == "step-00000003"
    assert rc == 1 and newest["verified"] is False and reason in newest["error"], newest
    assert newest["unsafe"] is (verdict == "unsafe")

    ck = Checkpointer(policy(), store, read_only=True)
    state = small_state(-1.0)
    if verdict == "unsafe":
        # Resume stops at an unsafe newest checkpoint, as ls says it will.
        with pytest.raises(UnsafeCheckpointError, match=f"step-00000003.*{reason}"):
            ck.load_latest(state)
        proc = run_ls(store)
        assert "UNSAFE" in proc.stdout and "resume stops" in proc.stderr
    else:
        with pytest.warns(CheckpointWarning, match=f"step-00000003.*{reason}"):
            assert ck.load_latest(state).step == 2
    assert not marker.exists()  # nothing from the file ever ran


def test_a_verified_checkpoint_is_one_resume_loads(tmp_path):
    store = tmp_path / "store"
    three_saves(store)
    rc, data = ls_json(store)
    assert rc == 0 and [c["verified"] for c in data["checkpoints"]] == [True, True, True]
    state = small_state(-1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        assert Checkpointer(policy(), store, read_only=True).load_latest(state).step == 3


def test_a_damaged_safetensors_header_with_a_matching_hash_is_caught(tmp_path):
    store = tmp_path / "store"
    three_saves(store, "safetensors")
    d = store / "step-00000003"
    data = bytearray((d / "model.safetensors").read_bytes())
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (d / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + bytes(data[8 + n:]))
    rehash(d, "model.safetensors")
    info = inspect_checkpoint(d, store)
    assert info.verified is False and "model.safetensors" in info.error and "byte range" in info.error
    with pytest.warns(CheckpointWarning, match="model.safetensors"):
        assert Checkpointer(policy(fmt="safetensors"), store, read_only=True).load_latest(small_state(0.0)).step == 2


# --------------------------------------------------------------------------
# The allowlist covers every safe state and stays inside torch's own
# --------------------------------------------------------------------------


def every_dtype():
    """Every dtype torch can create and save (not int1 ... int7, not the quantized ones)."""
    out = []
    for name in sorted(dir(torch)):
        dt = getattr(torch, name)
        if not isinstance(dt, torch.dtype) or dt in out:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # complex32 is "experimental"
                torch.save(torch.zeros(3, dtype=dt), io.BytesIO())
        except Exception:
            continue
        out.append(dt)
    return out


def test_every_safe_state_verifies(tmp_path):
    dtypes = every_dtype()
    assert torch.float32 in dtypes and torch.float8_e4m3fn in dtypes and torch.uint16 in dtypes
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 2)
    state = {
        "model": model,
        "optimizer": opt,
        "scheduler": sched,
        "scaler": torch.amp.GradScaler("cpu"),
        "rng": rng_state(),
        "tensors": {str(dt): torch.zeros(3, dtype=dt) for dt in dtypes},
        "dtypes": [dt for dt in dtypes],
        "plain": [1, 2.5, float("inf"), True, None, "s", b"bytes", (1, 2), {"k": [torch.Size([2, 3])]}],
        "ordered": collections.OrderedDict(a=torch.device("cpu")),
        "parameter": torch.nn.Parameter(torch.ones(2)),
        "big int": 2 ** 80,
    }
    for fmt in ("torch", "safetensors"):
        ck = Checkpointer(policy(fmt=fmt), tmp_path / fmt, verify="none")
        ck.save(Progress(5), state)
        ck.close()
        info = inspect_checkpoint(tmp_path / fmt / "step-00000005", tmp_path / fmt)
        assert info.verified is True, info.error
        torch.load(tmp_path / fmt / "step-00000005" / "state.pt", weights_only=True)


def test_the_allowlist_is_inside_torchs_weights_only_allowlist():
    from torch._weights_only_unpickler import _get_allowed_globals

    assert set(ALLOWED_GLOBALS) <= set(_get_allowed_globals())


# --------------------------------------------------------------------------
# Symlinks inside a store are refused, and named
# --------------------------------------------------------------------------


def test_a_symlinked_state_file_is_refused_and_named(tmp_path):
    store = tmp_path / "store"
    three_saves(store)
    d = store / "step-00000003"
    os.unlink(d / "state.pt")
    os.symlink("/etc/passwd", d / "state.pt")
    rehash(d)  # even with the hash of /etc/passwd in the manifest
    rc, data = ls_json(store)
    newest = data["checkpoints"][-1]
    assert rc == 1 and "state.pt is a symlink" in newest["error"] and "truncated" not in newest["error"]
    with pytest.warns(CheckpointWarning, match="state.pt is a symlink"):
        assert Checkpointer(policy(), store, read_only=True).load_latest(small_state(0.0)).step == 2


def test_a_symlinked_manifest_is_refused(tmp_path):
    store = tmp_path / "store"
    three_saves(store)
    d = store / "step-00000003"
    (tmp_path / "elsewhere.json").write_bytes((d / "manifest.json").read_bytes())
    os.unlink(d / "manifest.json")
    os.symlink(tmp_path / "elsewhere.json", d / "manifest.json")
    info = inspect_checkpoint(d, store)
    assert info.verified is False and "manifest.json is a symlink" in info.error


def test_a_symlinked_checkpoint_directory_is_reported_not_ignored(tmp_path):
    store = tmp_path / "store"
    three_saves(store)
    os.rename(store / "step-00000003", tmp_path / "moved")
    os.symlink(tmp_path / "moved", store / "step-00000003")
    rc, data = ls_json(store)
    names = {c["name"]: c for c in data["checkpoints"]}
    assert rc == 1 and "step-00000003" in names
    assert "is a symlink" in names["step-00000003"]["error"]
    with pytest.warns(CheckpointWarning, match="step-00000003 is a symlink"):
        assert Checkpointer(policy(), store, read_only=True).load_latest(small_state(0.0)).step == 2


# --------------------------------------------------------------------------
# ls on a run folder; ls without torch
# --------------------------------------------------------------------------


def test_ls_on_a_run_folder_finds_the_store_below_it(tmp_path):
    three_saves(tmp_path / "out" / "checkpoints")
    proc = run_ls(tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "no checkpoints directly in" in proc.stdout
    assert str(tmp_path / "out" / "checkpoints") in proc.stdout and "3 checkpoints" in proc.stdout
    assert "step-00000003" in proc.stdout
    rc, data = ls_json(tmp_path / "out")
    assert rc == 0 and [s["dir"] for s in data["stores"]] == [str(tmp_path / "out" / "checkpoints")]
    assert [c["step"] for c in data["stores"][0]["checkpoints"]] == [1, 2, 3]


def test_ls_on_a_folder_without_stores_says_where_to_look(tmp_path):
    (tmp_path / "out" / "logs").mkdir(parents=True)
    proc = run_ls(tmp_path / "out")
    assert proc.returncode == 0
    assert "0 checkpoints" in proc.stdout
    assert "[storage].dir" in proc.stderr and "no checkpoint store below" in proc.stderr


LIST_WITHOUT_TORCH = """
import sys
import saverules.ls
rc = saverules.ls.main(sys.argv[1:])
loaded = "torch" in sys.modules
print("RC", rc, "TORCH", loaded)
"""


def test_listing_and_hashing_do_not_import_torch(tmp_path):
    three_saves(tmp_path / "store", "safetensors")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args, torch_expected in (([], False), (["--json"], False), (["--no-verify"], False), (["--load"], True)):
        proc = subprocess.run([sys.executable, "-c", LIST_WITHOUT_TORCH, str(tmp_path / "store"), *args],
                              capture_output=True, text=True, env=env, timeout=120)
        last = proc.stdout.strip().splitlines()[-1]
        assert last == f"RC 0 TORCH {torch_expected}", proc.stdout + proc.stderr


# --------------------------------------------------------------------------
# The structure check answers every input with a verdict, never a crash
# --------------------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import strategies as hst

from saverules.store import structure  # noqa: E402


def _archive(pickle_bytes: bytes, compress: int = zipfile.ZIP_STORED) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as z:
        z.writestr("archive/data.pkl", pickle_bytes)
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def _saved_state() -> bytes:
    buf = io.BytesIO()
    state = {"format": "saverules-state", "step": 3, "objects": {"m": {"w": torch.ones(2), "b": torch.zeros(3)}},
             "values": {"lr": 0.1, "name": "x", "size": torch.Size([2]), "flags": [True, None]}}
    torch.save(state, buf)
    return buf.getvalue()


SAVED = _saved_state()
with zipfile.ZipFile(io.BytesIO(SAVED)) as _z:
    PICKLE_NAME = next(n for n in _z.namelist() if n.endswith("data.pkl"))
    VALID_PICKLE = _z.read(PICKLE_NAME)


def _with_pickle(pickle_bytes: bytes) -> bytes:
    """The saved archive with its data.pkl replaced (every tensor record kept)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(SAVED)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item, pickle_bytes if item.filename == PICKLE_NAME else zin.read(item.filename))
    return out.getvalue()


@given(hst.binary(max_size=400))
def test_any_bytes_as_a_state_file_get_a_verdict(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "state.pt"
    for content in (data, _with_pickle(data)):
        path.write_bytes(content)
        with pytest.raises(structure.StructureError):
            structure.check_state_file(str(path), 3)


@given(hst.data())
def test_a_mutated_pickle_gets_a_verdict_and_what_passes_torch_loads(tmp_path_factory, data):
    raw = bytearray(VALID_PICKLE)
    for _ in range(data.draw(hst.integers(1, 3))):
        i = data.draw(hst.integers(0, len(raw) - 1))
        raw[i] = data.draw(hst.integers(0, 255))
    path = tmp_path_factory.mktemp("mutated") / "state.pt"
    path.write_bytes(_with_pickle(bytes(raw)))
    try:
        facts = structure.check_state_file(str(path), 3)
    except structure.StructureError:
        return
    # Accepted: then resume's own reader must accept it too, and find what the check found.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's notes on unusual opcodes
        loaded = torch.load(path, weights_only=True, map_location="cpu")  # as resume reads it
    assert facts.step == 3 and loaded["step"] == 3 and loaded["format"] == "saverules-state"


def test_a_compressed_data_pkl_is_foreign_and_tensor_records_must_be_there(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(_with_pickle(VALID_PICKLE))
    assert structure.check_state_file(str(path), 3).step == 3  # the rebuilt archive is a good one
    path.write_bytes(_archive(VALID_PICKLE, zipfile.ZIP_DEFLATED))
    with pytest.raises(structure.StructureError, match="compressed"):
        structure.check_state_file(str(path), 3)
    path.write_bytes(_archive(VALID_PICKLE))
    with pytest.raises(structure.StructureError, match="lacks the tensor data record"):
        structure.check_state_file(str(path), 3)  # the pickle is fine, its tensors are not in this archive


def test_a_format_the_structure_check_does_not_know_is_left_to_its_hashes(tmp_path):
    store = tmp_path / "store"
    three_saves(store)
    d = store / "step-00000003"
    (d / "state.pt").write_bytes(b"another format's own layout")
    rehash(d)
    m = json.loads((d / "manifest.json").read_text())
    assert inspect_checkpoint(d, store).verified is False  # as a "torch" checkpoint it is damaged
    m["storage_format"] = "some-future-format"
    (d / "manifest.json").write_text(json.dumps(m))
    assert inspect_checkpoint(d, store).verified is True  # its own format checks its files

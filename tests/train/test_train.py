"""The reference training loop, run as a real subprocess (CPU, tiny model, few steps)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
# Runs the loop with a test's clock, signals, holds and decision reports (see its docstring).
DRIVER = REPO / "tests" / "helpers" / "drive_train.py"

# Small and fast: 32-token windows, micro-batches of 4, one thread, deterministic kernels.
FAST = ["--max_seq_len", "32", "--batch_size", "4", "--deterministic", "--progress", "log", "--log_interval", "5"]

POLICY = """
version = 1
final = true

[[rules]]
kind = "every_steps"
every = {every}

[[rules]]
kind = "on_signal"
signals = ["SIGTERM", "SIGUSR1"]
"""


def reason_of(policy_text, index):
    """The reason string the engine reports for rule ``index`` of a policy (its own rendering, not ours)."""
    import saverules
    from saverules.engine.rules import describe

    return describe(saverules.loads(policy_text).rules[index])


# what the engine prints for the on_signal rule of POLICY and DDP_POLICY
ON_SIGNAL = reason_of(POLICY.format(every=1), 1)


def env_for(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def train_cmd(*args, driver=None):
    """The loop's command line; with ``driver`` flags, run through tests/helpers/drive_train.py."""
    if driver is None:
        return [sys.executable, "-m", "saverules.minimind.train", *FAST, *args]
    return [sys.executable, str(DRIVER), *driver, *FAST, *args]


def run_train(cwd, *args, env=None, driver=None, timeout=120):
    proc = subprocess.run(train_cmd(*args, driver=driver), cwd=cwd, env=env_for(env), capture_output=True,
                          text=True, timeout=timeout)
    return proc


def write_policy(path, every=4, text=None):
    path.write_text(text if text is not None else POLICY.format(every=every))
    return str(path)


def write_data(path, n_docs):
    from saverules.minimind.data import default_corpus, write_jsonl

    write_jsonl(path, default_corpus(n_docs, seed=3))
    return str(path)


def checkpoints(out_dir, sub="checkpoints"):
    root = Path(out_dir) / sub
    found = {}
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        m = d / "manifest.json"
        if d.is_dir() and m.is_file():
            found[json.loads(m.read_text())["step"]] = d
    return found


def manifest(path):
    return json.loads((Path(path) / "manifest.json").read_text())


def payload(path):
    """What a checkpoint holds, read by the store (whatever its format), as {"objects", "values"}."""
    from saverules.store import inspect_checkpoint, read_checkpoint

    info = inspect_checkpoint(path)
    assert info.ok, info.error
    got = read_checkpoint(info, "cpu")
    return {"objects": got.objects, "values": got.values, "decider": got.decider, "clock": got.clock}


def same_tensors(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


def saved_lines(stdout):
    return [int(line.split()[2].rstrip(":")) for line in stdout.splitlines() if line.startswith("saved step ")]


def wait_for_line(proc, needle, timeout=120):
    """Read the child's stdout until a line contains ``needle``; returns everything read."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"never saw {needle!r}; output so far:\n{''.join(seen)}\n{proc.stderr.read()}")


# -- a tiny run ------------------------------------------------------------------------


def test_tiny_run_with_the_default_rules_saves_the_final_step_and_learns(tmp_path):
    import saverules

    # no --rules and no rules/ folder here: the packaged rules/default.toml
    proc = run_train(tmp_path, "--max_steps", "40", "--learning_rate", "3e-3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "default.toml, checkpoints in" in out
    # every save the engine's own simulation of this run makes, each on its own line with its reasons
    sim = saverules.load(REPO / "rules" / "default.toml").simulate(40, steps_per_epoch=500)
    assert saved_lines(out) == sim.saved_steps and sim.saved_steps[-1] == 40
    for step, reasons in sim.saves:
        if step == 40:
            # --max_steps stops mid-epoch: the loop does not call step 40 an epoch end; the
            # simulation treats the end of the run as the end of an epoch
            reasons = tuple(r for r in reasons if r != "epoch_end")
        assert f"saved step {step}: {', '.join(reasons)}\n" in out
    assert "final" in dict(sim.saves)[40]
    # the summary: where the checkpoints are, which were kept and why, what retention removed
    ck = checkpoints(tmp_path / "out")
    kept = sim.kept
    assert sorted(ck) == kept and 40 in kept and len(kept) < len(sim.saved_steps)
    assert f"checkpoints in out/checkpoints ({len(kept)}):" in out
    for step in kept:
        assert f"  step-{step:08d}  step {step}" in out
    assert "kept by: newest, final" in out
    removed = [s for s in sim.saved_steps if s not in kept]
    assert f"removed by retention: steps {', '.join(map(str, removed))}" in out
    assert "every trained step is covered: the final step 40 is saved" in out
    assert manifest(ck[40])["final"] is True
    # the loss goes down
    losses = [float(l.split(" loss ")[1].split()[0]) for l in out.splitlines() if l.startswith("step ")]
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.5, losses


# -- exact resume after a real kill ----------------------------------------------------------------

RESUME_ARGS = ["--epochs", "3", "--accumulation_steps", "3", "--seed", "7"]


def start_held_run(tmp_path, hold_at=6):
    """The resume-shaped run (every 2 steps), held after step ``hold_at``; returns (proc, rules, data)."""
    data = write_data(tmp_path / "data.jsonl", 40)
    rules = write_policy(tmp_path / "p.toml", every=2)
    cmd = train_cmd("--rules", rules, "--data_path", data, *RESUME_ARGS, driver=["--hold-at", str(hold_at)])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, rules, data


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """3 epochs of 10 micro-batches with accumulation 3: 4 steps per epoch (the last window has 1)."""
    tmp = tmp_path_factory.mktemp("full")
    data = write_data(tmp / "data.jsonl", 40)
    rules = write_policy(tmp / "p.toml", every=2)
    proc = run_train(tmp, "--rules", rules, "--data_path", data, *RESUME_ARGS)
    assert proc.returncode == 0, proc.stderr
    return tmp, proc.stdout


def test_uninterrupted_run_shape(uninterrupted):
    tmp, out = uninterrupted
    assert "12 steps (4 per epoch, 3 micro-batch(es) of 4 each)" in out
    assert saved_lines(out) == [2, 4, 6, 8, 10, 12]


def test_resume_after_sigkill_is_exact(uninterrupted, tmp_path):
    full, full_out = uninterrupted
    # Hold after step 6 (mid-epoch), then SIGKILL: no chance to save anything more.
    proc, rules, data = start_held_run(tmp_path)
    try:
        first = wait_for_line(proc, "holding at step 6")
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert "saved step 6: every_steps(every=2)" in first
    assert saved_lines(first) == [2, 4, 6]

    resumed = run_train(tmp_path, "--rules", rules, "--data_path", data, *RESUME_ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 6 (epoch 2/3)" in resumed.stdout  # 1-based, as the log lines count epochs
    assert saved_lines(first) + saved_lines(resumed.stdout) == saved_lines(full_out)

    a, b = checkpoints(full / "out"), checkpoints(tmp_path / "out")
    assert sorted(a) == sorted(b) == [2, 4, 6, 8, 10, 12]
    for step in (8, 10, 12):
        pa, pb = payload(a[step]), payload(b[step])
        assert same_tensors(pa["objects"]["model"], pb["objects"]["model"]), f"weights differ at step {step}"
        sa, sb = pa["objects"]["optimizer"]["state"], pb["objects"]["optimizer"]["state"]
        assert all(same_tensors(sa[k], sb[k]) for k in sa)
        assert pa["objects"]["loop"] == pb["objects"]["loop"]
        assert manifest(a[step])["reasons"] == manifest(b[step])["reasons"]


def test_sigterm_saves_the_next_step_exits_0_and_resumes(uninterrupted, tmp_path):
    full, full_out = uninterrupted
    proc, rules, data = start_held_run(tmp_path)
    try:
        wait_for_line(proc, "holding at step 6")
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"saved step 7: {ON_SIGNAL}" in rest
    assert "stopped by SIGTERM after step 7 of 12" in rest
    assert "every trained step is covered: the final step 7 is saved" in rest
    ck = checkpoints(tmp_path / "out")
    assert sorted(ck) == [2, 4, 6, 7]

    resumed = run_train(tmp_path, "--rules", rules, "--data_path", data, *RESUME_ARGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 7" in resumed.stdout
    assert saved_lines(resumed.stdout) == [8, 10, 12]
    a, b = payload(checkpoints(full / "out")[12]), payload(checkpoints(tmp_path / "out")[12])
    assert same_tensors(a["objects"]["model"], b["objects"]["model"])


def test_sigusr1_saves_and_training_goes_on_with_a_progress_bar(tmp_path):
    rules = write_policy(tmp_path / "p.toml", every=100)
    proc = run_train(tmp_path, "--rules", rules, "--max_steps", "12", "--progress", "bar",
                     driver=["--send-signal", "5:0:SIGUSR1"])
    assert proc.returncode == 0, proc.stderr
    assert saved_lines(proc.stdout) == [6, 12]
    assert f"saved step 6: {ON_SIGNAL}" in proc.stdout
    assert "stopped by" not in proc.stdout
    assert sorted(checkpoints(tmp_path / "out")) == [6, 12]
    # the bar (stderr) shows the step, the loss, the learning rate and the time left
    bar = proc.stderr.replace("\r", "\n").splitlines()
    last = [l for l in bar if "12/12" in l][-1]
    assert "<00:00" in last and "loss=" in last and "lr=" in last, last
    # the save lines are on stdout, each on its own line, not mixed into the bar
    assert not any("saved step" in l for l in bar)


def test_sigterm_without_on_signal_rule_stops_unsaved_with_143(tmp_path):
    rules = write_policy(tmp_path / "p.toml", text='version = 1\nfinal = true\n[[rules]]\nkind = "every_steps"\nevery = 4\n')
    proc = run_train(tmp_path, "--rules", rules, "--max_steps", "20",
                     driver=["--send-signal", "5:0:SIGTERM"])
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    out = proc.stdout
    assert "has no on_signal rule: SIGTERM will stop training without a save" in out
    assert saved_lines(out) == [4]
    assert "stopped by SIGTERM after step 6 of 20" in out
    assert "steps 5-6 (2 steps of training) are in no checkpoint" in out
    assert sorted(checkpoints(tmp_path / "out")) == [4]


# -- gradient accumulation tail ---------------------------------------------------------------


def test_final_partial_accumulation_window_is_in_the_final_checkpoint(tmp_path):
    from saverules.minimind.data import ByteTokenizer, PretrainDataset, ResumableSampler
    from saverules.minimind.model import MiniMindLM, ModelConfig

    data = write_data(tmp_path / "data.jsonl", 40)  # 10 micro-batches of 4
    rules = write_policy(tmp_path / "p.toml", every=1)
    proc = run_train(tmp_path, "--rules", rules, "--data_path", data, "--accumulation_steps", "4", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    # windows of 4, 4 and 2 micro-batches: 3 optimizer steps, the last one saved as final
    assert "3 steps (3 per epoch, 4 micro-batch(es) of 4 each)" in proc.stdout
    ck = checkpoints(tmp_path / "out")
    assert sorted(ck) == [1, 2, 3] and manifest(ck[3])["final"] is True
    p2, p3 = payload(ck[2]), payload(ck[3])
    assert p3["objects"]["loop"]["batches_done"] == 10

    # Redo the last update by hand from the step-2 checkpoint: batches 8 and 9, each loss / 2.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = ModelConfig.from_dict(p2["values"]["model_config"])
        model = MiniMindLM(cfg)
        model.load_state_dict(p2["objects"]["model"])
        opt = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.1, betas=(0.9, 0.95))
        opt.load_state_dict(p2["objects"]["optimizer"])
        ds = PretrainDataset(data, ByteTokenizer(), cfg.max_seq_len)
        sampler = ResumableSampler(ds, seed=5)
        sampler.set_epoch(0)
        sampler.set_start(8, 4)
        batches = list(torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler))
        assert len(batches) == 2
        for x, y in batches:
            _, loss = model(x, y)
            (loss / 2).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    finally:
        torch.set_num_threads(threads)
    final = p3["objects"]["model"]
    assert same_tensors(model.state_dict(), final)
    assert not same_tensors(p2["objects"]["model"], final)


# -- legacy policy comparison ---------------------------------------------------------------------

# minimind's own rule, (step + 1) % save_interval == 0 and no save at the end, with an interval
# shorter than the run: the steps after the last multiple are lost.
LEGACY_SHORT = """
version = 1
final = false

[[rules]]
kind = "every_steps"
every = 7
"""


def test_legacy_policy_reports_unsaved_steps_default_does_not(tmp_path):
    for sub in ("legacy", "short", "default"):
        (tmp_path / sub).mkdir()
    # rules/minimind-legacy.toml: every 20000 steps, no final save: a 30-step run saves nothing
    legacy = run_train(tmp_path / "legacy", "--rules", str(REPO / "rules" / "minimind-legacy.toml"),
                       "--max_steps", "30")
    assert legacy.returncode == 0, legacy.stderr
    assert saved_lines(legacy.stdout) == []
    assert "saved nothing" in legacy.stdout
    assert "steps 1-30 (30 steps of training) are in no checkpoint" in legacy.stdout
    assert checkpoints(tmp_path / "legacy" / "out") == {}

    short = run_train(tmp_path / "short", "--rules", write_policy(tmp_path / "short.toml", text=LEGACY_SHORT),
                      "--max_steps", "30")
    assert short.returncode == 0, short.stderr
    assert saved_lines(short.stdout) == [7, 14, 21, 28]
    assert "steps 29-30 (2 steps of training) are in no checkpoint" in short.stdout

    default = run_train(tmp_path / "default", "--rules", str(REPO / "rules" / "default.toml"), "--max_steps", "30")
    assert default.returncode == 0, default.stderr
    assert saved_lines(default.stdout)[-1] == 30
    assert "every trained step is covered: the final step 30 is saved" in default.stdout
    assert "in no checkpoint" not in default.stdout


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rules", "nope.toml"], "--rules nope.toml: no such file"),
        (["--data_path", "missing.jsonl"], "data file not found"),
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--preset", "huge"], "unknown model preset 'huge'"),
    ],
)
def test_bad_arguments_give_a_clear_error(tmp_path, monkeypatch, capsys, args, message):
    # in this process (the command line itself is checked by the next test): each fails before training
    from saverules.minimind.train import main

    monkeypatch.chdir(tmp_path)
    try:
        code = main([*args, "--max_steps", "2", "--progress", "none"])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not (tmp_path / "out").exists()


def test_bad_policy_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[[rules]]\nkind = "every_steps"\nevery = -3\n')
    proc = run_train(tmp_path, "--rules", str(bad), "--max_steps", "2")
    assert proc.returncode == 2
    assert "bad.toml" in proc.stderr and ":4:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_refuses_to_mix_runs_without_resume(tmp_path):
    rules = write_policy(tmp_path / "p.toml", every=2)
    assert run_train(tmp_path, "--rules", rules, "--max_steps", "2").returncode == 0
    again = run_train(tmp_path, "--rules", rules, "--max_steps", "2")
    assert again.returncode == 2
    assert "already holds checkpoints (latest: step 2)" in again.stderr
    assert "--resume" in again.stderr


# -- DDP under torchrun -----------------------------------------------------------------------------

DDP_POLICY = """
version = 1
final = true

[[rules]]
kind = "every_time"
every = "2s"

[[rules]]
kind = "on_signal"
signals = ["SIGTERM", "SIGUSR1"]
"""


def run_ddp(tmp_path, rules, signals, max_steps=48):
    """Two gloo ranks under torchrun; rank 0 runs 8 steps per (simulated) second and rank 1's
    clock runs 3x fast and 1000 s ahead.  Returns the process and each rank's decision report."""
    report = tmp_path / "report"
    driver = ["--step-seconds", "0.125", "--clock-skew", "1:3:1000", "--report", str(report)]
    for item in signals.split(","):
        driver += ["--send-signal", item]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(DRIVER), *driver, *FAST, "--rules", rules, "--max_steps", str(max_steps)]
    # the timeout is the hang check: a rank left waiting in a collective would never return
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for({"OMP_NUM_THREADS": "1"}), capture_output=True, text=True,
                          timeout=180)
    reports = [[json.loads(l) for l in Path(f"{report}.rank{r}").read_text().splitlines()] for r in (0, 1)]
    return proc, reports


def decisions(report):
    return [(d["step"], d["save"], d["reasons"], d["signal"], d["collectives"]) for d in report]


def test_ddp_two_gloo_ranks_agree_with_skewed_clocks_and_a_one_rank_signal(tmp_path):
    from saverules.distributed import sync_schedule

    rules = write_policy(tmp_path / "p.toml", text=DDP_POLICY)
    # rank 1 alone gets SIGUSR1 after step 9 and SIGTERM after step 33
    proc, (r0, r1) = run_ddp(tmp_path, rules, "9:1:SIGUSR1,33:1:SIGTERM")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert decisions(r0) == decisions(r1)
    saves = [(d["step"], d["reasons"]) for d in r0 if d["save"]]
    sig, every_time = reason_of(DDP_POLICY, 1), reason_of(DDP_POLICY, 0)
    # Sync steps at 8 steps/s with sync_seconds=1 (docs/distributed.md): 1, 2, 4, 8, 16, 24, 32, 40, 48.
    # SIGUSR1 reaches the loop at step 10 -> sync 16; every_time (2 s of rank 0's clock after
    # that save at t=2.0) is due at step 32; SIGTERM reaches the loop at step 34 -> sync 40,
    # where every rank saves and stops.
    schedule = sync_schedule(48, 0.125)
    assert schedule == [1, 2, 4, 8, 16, 24, 32, 40, 48]
    assert saves == [(16, [sig]), (32, [every_time]), (40, [sig])]
    assert r0[-1]["step"] == r1[-1]["step"] == 40
    assert r0[-1]["signal"] == "SIGTERM"
    # the promised number of collectives: one per sync step, none in between
    for d in r0:
        assert d["collectives"] == len([s for s in schedule if s <= d["step"]])
    assert r0[-1]["collectives"] == 8
    # only rank 0 wrote: exactly the three checkpoints, no per-rank copies
    ck = checkpoints(tmp_path / "out")
    assert sorted(ck) == [16, 32, 40]
    assert manifest(ck[40])["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoints"]
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    # the writing rank's lock file (cleared when it closed the store), the policy, the checkpoints
    assert names == [".saverules.lock", "policy.toml", "step-00000016", "step-00000032", "step-00000040"]
    assert (tmp_path / "out" / "checkpoints" / ".saverules.lock").read_text() == ""
    assert "stopped by SIGTERM after step 40 of 48" in proc.stdout


STEP_ONLY = 'version = 1\nfinal = true\n[[rules]]\nkind = "every_steps"\nevery = 10\n'


def test_ddp_sigterm_on_one_rank_stops_every_rank_at_one_step_without_an_on_signal_rule(tmp_path):
    from saverules.distributed import sync_schedule

    rules = write_policy(tmp_path / "p.toml", text=STEP_ONLY)
    # rank 0 gets SIGUSR1 (nothing to do without an on_signal rule), rank 1 SIGTERM, both after step 13:
    # the loop still has the ranks agree on signals, so both stop after sync step 16, unsaved
    proc, (r0, r1) = run_ddp(tmp_path, rules, "13:0:SIGUSR1,13:1:SIGTERM")
    assert proc.returncode != 0  # stopped before the end with steps unsaved: 143 from each rank
    assert "stopped by SIGTERM after step 16 of 48" in proc.stdout
    assert "steps 11-16 (6 steps of training) are in no checkpoint" in proc.stdout
    assert decisions(r0) == decisions(r1)
    assert [d["step"] for d in r0 if d["save"]] == [10]
    assert r0[-1]["step"] == r1[-1]["step"] == 16 and r0[-1]["signal"] == "SIGTERM"
    assert r0[-1]["collectives"] == len([s for s in sync_schedule(48, 0.125) if s <= 16]) == 5
    assert sorted(checkpoints(tmp_path / "out")) == [10]

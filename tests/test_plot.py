"""``check --plot`` draws what ``check`` simulates: read back from matplotlib's artists and the SVG's elements.

No assertion is about pixels: the saves, the kept checkpoints, the gap's label and the
legend are read from the drawn figure (each carries a ``gid``) and from the SVG file
(where a ``gid`` is a group's ``id``), and compared with the simulation and with the
text ``check`` prints.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from matplotlib.colors import to_rgb

from saverules import check, plot
from saverules.engine.rules import static_reason

REPO = Path(__file__).resolve().parent.parent
RULES = sorted((REPO / "rules").glob("*.toml"))
SVG = "{http://www.w3.org/2000/svg}"


def run_check(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = check.main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def reports(*argv: str) -> list[check.Report]:
    args = check.parser().parse_args(list(argv))
    return [check.analyse(path, args) for path in args.files]


def by_gid(fig, pattern: str) -> list:
    rx = re.compile(pattern)
    return [a for a in fig.findobj() if a.get_gid() is not None and rx.fullmatch(a.get_gid())]


def legend_texts(fig) -> list[str]:
    (legend,) = by_gid(fig, "legend")
    return [t.get_text() for t in legend.get_texts()]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), "the PNG is cut short"
    return width, height


def svg_groups(path: Path) -> dict[str, ET.Element]:
    root = ET.parse(path).getroot()
    return {g.get("id"): g for g in root.iter(f"{SVG}g") if g.get("id")}


def svg_marks(group: ET.Element) -> int:
    """How many markers a scatter drew in the SVG: one <use> of a shared marker per point, or,
    where matplotlib finds that dearer, one <path> per point."""
    uses = list(group.iter(f"{SVG}use"))
    if uses:
        return len(uses)
    return sum(1 for child in group if child.tag == f"{SVG}path")


def svg_text(group: ET.Element) -> str:
    return " ".join("".join(t.itertext()) for t in group.iter(f"{SVG}text"))


def printed_gap(stdout: str) -> str:
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("  max gap  ")]
    return line[len("  max gap  "):].split(": the most work")[0]


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_every_shipped_policy_draws_what_check_simulates(path, tmp_path):
    rel = str(path.relative_to(REPO))
    png, svg = tmp_path / "s.png", tmp_path / "s.svg"
    code, stdout, stderr = run_check(str(path), "--plot", str(png))
    assert code == 0, stderr
    assert f"plot: wrote {png}" in stderr and "Traceback" not in stderr
    assert run_check(str(path), "--plot", str(svg))[0] == 0

    (report,) = reports(str(path))
    sim = report.simulation
    assert sim is not None and sim.complete
    fig = plot.figure([plot.row_of(report)])
    saves = by_gid(fig, r"saves-0-0-\d+")
    drawn = sorted(x for c in saves for x in c.get_offsets()[:, 0])
    assert drawn == sim.saved_steps  # one mark per save, at its step
    (kept,) = by_gid(fig, "kept-0-0")
    assert sorted(kept.get_offsets()[:, 0]) == sim.kept
    tiers = report.tiers
    if tiers is None:
        assert not by_gid(fig, r"(saves|kept)-0-1.*")  # one tier: one lane
    else:  # a durable tier (rules/two-tier.toml): its lane holds the tier's simulated saves and kept set
        durable = sorted(x for c in by_gid(fig, r"saves-0-1-\d+") for x in c.get_offsets()[:, 0])
        assert durable == [s for s, _ in tiers.durable.saves] and durable
        (durable_kept,) = by_gid(fig, "kept-0-1")
        assert sorted(durable_kept.get_offsets()[:, 0]) == sorted(tiers.durable.kept)
    (label,) = by_gid(fig, "gap-label-0")
    assert label.get_text() == f"largest gap: {printed_gap(stdout)}"
    names = legend_texts(fig)
    fired = {static_reason(reason) for reason in sim.fired}
    for rule in fired:
        assert any(text == rule or text.startswith(f"{rule}: fired") for text in names), (rule, names)
    first = {step: static_reason(reasons[0]) for step, reasons in sim.saves}
    (legend,) = by_gid(fig, "legend")
    shown = {t.get_text(): to_rgb(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)
             if hasattr(h, "get_color")}
    for c in saves:  # each rule's saves in one colour, the one its legend entry shows
        (rule,) = {first[int(x)] for x in c.get_offsets()[:, 0]}
        assert {tuple(rgba[:3]) for rgba in c.get_edgecolor()} == {shown[rule]}

    # the SVG holds the same marks, the same label and the same legend
    groups = svg_groups(svg)
    marks = sum(svg_marks(g) for gid, g in groups.items() if re.fullmatch(r"saves-0-0-\d+", gid))
    assert marks == len(sim.saves)
    assert svg_marks(groups["kept-0-0"]) == len(sim.kept)
    assert printed_gap(stdout) in svg_text(groups["gap-label-0"])
    legend = svg_text(groups["legend"])
    assert all(rule in legend for rule in fired)
    assert ("epochs-0" in groups) == (report.steps_per_epoch is not None)

    width, height = png_size(png)
    assert width == 1100 and 250 <= height <= 1200, (width, height)
    assert 5_000 < png.stat().st_size < 400_000
    assert rel  # (the file's name is in the row's title)
    assert fig.axes[0].get_title(loc="left").startswith(f"{path}:")


def test_kept_and_deleted_saves_are_told_apart():
    (report,) = reports(str(REPO / "rules/default.toml"))
    sim = report.simulation
    fig = plot.figure([plot.row_of(report)])
    alpha = {}
    for c in by_gid(fig, r"saves-0-0-\d+"):
        for (x, _), rgba in zip(c.get_offsets(), c.get_edgecolor() if len(c.get_edgecolor()) else c.get_facecolor()):
            alpha[int(x)] = rgba[3]
    assert {s for s, a in alpha.items() if a == 1.0} == set(sim.kept)
    assert all(a == plot.DELETED_ALPHA for s, a in alpha.items() if s not in sim.kept)
    assert "deleted by retention (faded)" in legend_texts(fig)


def test_several_files_compare_on_one_step_axis_with_overrides(tmp_path):
    out = tmp_path / "cmp.svg"
    files = [str(REPO / "rules/minimind-legacy.toml"), str(REPO / "rules/default.toml")]
    flags = ["--total-steps", "39998", "--steps-per-epoch", "19999", "--step-seconds", "2"]
    code, stdout, _ = run_check(*files, *flags, "--plot", str(out))
    assert code == 0
    got = reports(*files, *flags)
    fig = plot.figure([plot.row_of(r) for r in got])
    rows = [ax for ax in fig.axes if ax.get_title(loc="left")]
    assert [ax.get_title(loc="left").split(":")[0] for ax in rows] == files
    assert rows[0].get_shared_x_axes().joined(rows[0], rows[1])  # one step axis
    for r, report in enumerate(got):
        steps = sorted(x for c in by_gid(fig, rf"saves-{r}-0-\d+") for x in c.get_offsets()[:, 0])
        assert steps == report.simulation.saved_steps
        assert report.simulation.total_steps == 39998
    # the epoch lines are those of the override: 19,999-step epochs
    (epochs,) = by_gid(fig, "epochs-1")
    assert sorted({round(seg[0][0]) for seg in epochs.get_segments()}) == [19999, 39998]
    # the legacy row: the unsaved tail, in check's words
    (tail,) = by_gid(fig, "unsaved-label-0")
    assert "steps 20,001-39,998 are in no checkpoint (19,998 steps" in tail.get_text()
    assert "19,998 steps" in stdout
    # the time axis: the overridden step time, 39,998 x 2 s = 22h13m
    for ax in rows:
        (top,) = ax.child_axes
        assert top.get_xlabel() == "training time (hours, 2 s/step)"
    assert tail.get_text().endswith("(19,998 steps, 11h06m36s of training): final = false")
    groups = svg_groups(out)
    assert {"saves-0-0-0", "gap-label-0", "gap-label-1", "unsaved-0", "epochs-1"} <= set(groups)


def test_a_run_with_more_saves_than_listed_states_the_counted_remainder(tmp_path):
    total = str(2**63 - 1)
    out = tmp_path / "long.png"
    code, stdout, stderr = run_check(str(REPO / "rules/default.toml"), "--total-steps", total, "--plot", str(out))
    assert code == 0, stderr
    (report,) = reports(str(REPO / "rules/default.toml"), "--total-steps", total)
    sim = report.simulation
    assert not sim.complete and sim.save_count is not None
    fig = plot.figure([plot.row_of(report)])
    drawn = sum(len(c.get_offsets()) for c in by_gid(fig, r"saves-0-0-\d+"))
    assert drawn == len(sim.saves) + len(sim.last_saves)
    (label,) = by_gid(fig, "unlisted-label-0")
    assert f"{sim.save_count - drawn:,} more saves here, counted, not drawn" in label.get_text()
    assert f"{sim.save_count:,} saves ({drawn:,} drawn)" in fig.axes[0].get_title(loc="left")
    (gap,) = by_gid(fig, "gap-label-0")
    assert gap.get_text() == f"largest gap: {printed_gap(stdout)}" and "not known beyond" in gap.get_text()
    (note,) = by_gid(fig, "epochs-note-0")  # far too many epochs to draw: said, not drawn
    assert "too many to draw" in note.get_text() and not by_gid(fig, "epochs-0")
    assert f"plot: drawing {drawn:,} saves" in stderr
    png_size(out)


DURABLE = """\
version = 1
[run]
total_steps = 1000
[[rules]]
kind = "every_steps"
every = 50
[retention]
keep_last = 2
[storage]
dir = "local"
[durable]
dir = "s3://bucket/run"
[[durable.rules]]
kind = "every_steps"
every = 300
[durable.retention]
keep_last = 2
"""


def test_the_durable_lane_exists_exactly_when_the_policy_has_a_durable_tier(tmp_path):
    two = tmp_path / "two-tiers.toml"
    two.write_text(DURABLE)
    one = tmp_path / "one-tier.toml"
    one.write_text(DURABLE.split("[durable]")[0])
    reports_ = reports(str(one), str(two))
    fig = plot.figure([plot.row_of(r) for r in reports_])
    # row 0 (one tier): a single lane; row 1: local above durable
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["saves"]
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == ["local", "durable"]
    assert not by_gid(fig, r"saves-0-1-\d+") and not by_gid(fig, r"kept-0-1")
    tiers = reports_[1].tiers
    assert tiers is not None
    durable = sorted(x for c in by_gid(fig, r"saves-1-1-\d+") for x in c.get_offsets()[:, 0])
    assert durable == [s for s, _ in tiers.durable.saves] == [300, 600, 900, 1000]
    (kept,) = by_gid(fig, "kept-1-1")
    assert sorted(kept.get_offsets()[:, 0]) == sorted(tiers.durable.kept)
    local = sorted(x for c in by_gid(fig, r"saves-1-0-\d+") for x in c.get_offsets()[:, 0])
    assert local == [s for s, _ in tiers.local_saves]
    (lkept,) = by_gid(fig, "kept-1-0")
    assert sorted(lkept.get_offsets()[:, 0]) == sorted(tiers.local_kept)
    out = tmp_path / "tiers.png"
    code, _, _ = run_check(str(two), "--plot", str(out))
    assert code == 0
    png_size(out)


def test_files_that_cannot_be_drawn_are_named_in_the_figure(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('version = 1\n[[rules]]\nkind = "every_step"\nevery = 5\n')
    unsized = tmp_path / "unsized.toml"
    unsized.write_text('version = 1\n[[rules]]\nkind = "every_steps"\nevery = 5\n')
    out = tmp_path / "o.svg"
    code, _, _ = run_check(str(bad), str(unsized), str(REPO / "rules/default.toml"), "--plot", str(out))
    assert code == 1  # bad.toml's error, as without --plot
    text = " ".join(t.text or "" for t in ET.parse(out).getroot().iter(f"{SVG}text"))
    assert f"{bad}: not drawn, it has errors" in text
    assert f"{unsized}: not drawn, not simulated: no run length" in text


@pytest.mark.parametrize("target, says", [
    ("schedule.pdf", "must end in .png or .svg (got .pdf)"),
    ("schedule", "must end in .png or .svg (got no suffix)"),
    ("no/such/folder/s.png", "the folder no/such/folder does not exist"),
])
def test_a_bad_plot_target_is_a_usage_error(target, says, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_check(str(REPO / "rules/default.toml"), "--plot", target)
    assert code == 2 and says in stderr and "Traceback" not in stderr
    assert stdout == "" and not list(tmp_path.iterdir())


def test_the_readme_picture_is_made_by_its_documented_command(tmp_path):
    readme = (REPO / "README.md").read_text()
    (command,) = re.findall(r"^(python -m saverules\.check .*--plot (docs/\S+\.png))$", readme, re.M)
    line, picture = command
    assert f"]({picture})" in readme  # the README shows it
    committed = REPO / picture
    out = tmp_path / "again.png"
    argv = line.split()[3:]
    argv[argv.index(picture)] = str(out)
    proc = subprocess.run([sys.executable, "-m", "saverules.check", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert png_size(out) == png_size(committed)
    assert committed.stat().st_size < 150_000
    files = [a for a in argv if a.endswith(".toml")]
    assert files == ["rules/minimind-legacy.toml", "rules/default.toml"]
    fig = plot.figure([plot.row_of(r) for r in reports(*files)])
    assert [ax.get_title(loc="left").split(":")[0] for ax in fig.axes if ax.get_title(loc="left")] == files


def test_the_json_report_stays_on_stdout_while_plotting(tmp_path):
    out = tmp_path / "s.png"
    code, stdout, stderr = run_check(str(REPO / "rules/default.toml"), "--format", "json", "--plot", str(out))
    assert code == 0
    (doc,) = json.loads(stdout)["files"]
    assert len(doc["saves"]) == 30
    assert stderr.splitlines() == [f"plot: simulating {REPO / 'rules/default.toml'}",
                                   f"plot: drawing 30 saves of {REPO / 'rules/default.toml'}",
                                   f"plot: wrote {out} (1100 x {png_size(out)[1]} px)"]


def test_a_one_step_run_without_saves_is_drawn_and_said(tmp_path):
    policy = tmp_path / "none.toml"
    policy.write_text('version = 1\nfinal = false\n[run]\ntotal_steps = 1\n[[rules]]\nkind = "every_steps"\n'
                      'every = 5\n')
    code, stdout, _ = run_check(str(policy), "--plot", str(tmp_path / "n.png"))
    assert code == 0
    fig = plot.figure([plot.row_of(r) for r in reports(str(policy))])
    assert not by_gid(fig, r"(saves|kept)-.*")
    (tail,) = by_gid(fig, "unsaved-label-0")
    assert tail.get_text() == "step 1 is in no checkpoint (1 step): final = false"
    (gap,) = by_gid(fig, "gap-label-0")
    assert gap.get_text() == f"largest gap: {printed_gap(stdout)}" == "largest gap: 1 step"
    assert legend_texts(fig) == ["largest gap", "in no checkpoint"]

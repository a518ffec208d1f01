"""Turn a trainer's own save settings into a commented saverules policy.

    python -m saverules.convert --from-hf training_args.json -o policy.toml
    python -m saverules.convert --from-hf out/checkpoint-40/training_args.bin
    python -m saverules.convert --from-lightning 'ModelCheckpoint(every_n_train_steps=40, save_last=True)' --total-steps 130
    python -m saverules.convert --from-torchtitan train.toml

The policy goes to ``--output`` (or stdout), the comparison to stdout (or stderr
when the policy takes stdout): for the run in ``[run]`` (or ``--total-steps``),
the steps the trainer's settings would save and keep beside the steps the policy
saves and keeps, with every difference spelled out.  Settings a policy cannot
express exit 2, naming them; nothing in the input is run (see
:mod:`saverules.importers`).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from .engine.errors import PolicyError
from .engine.loader import loads
from .importers import hf, lightning, torchtitan
from .importers.draft import Draft, Refused, TrainerSchedule

#: With more differing steps than this, the comparison lists the first ones and counts the rest.
SHOWN_DIFFERENCES = 20


def draft_from(args: argparse.Namespace) -> Draft:
    """The draft policy for the source the arguments name; raises Refused."""
    shape = {"total_steps": args.total_steps, "steps_per_epoch": args.steps_per_epoch}
    if args.from_hf is not None:
        return hf.convert(hf.read(args.from_hf), os.path.basename(args.from_hf), **shape)
    if args.from_lightning is not None:
        return lightning.convert(lightning.parse(args.from_lightning), "--from-lightning", **shape)
    return torchtitan.convert(torchtitan.read(args.from_torchtitan), os.path.basename(args.from_torchtitan),
                              **shape)


def _steps(steps: Sequence[int]) -> str:
    return ", ".join(f"{s:,}" for s in steps) if steps else "none"


def compare(draft: Draft, text: str) -> list[str]:
    """The comparison of the trainer's schedule and the policy's, as lines of text."""
    policy = loads(text, source="<converted>")
    run = policy.run
    total = run.total_steps if run is not None else None
    spe = run.steps_per_epoch if run is not None else None
    if total is None:
        return ["not compared: the run's length is unknown; give --total-steps (or max_steps / [training] steps)"]
    sim = policy.simulate(total, spe)
    ours: TrainerSchedule = draft.trainer(total, spe)
    name = draft.source
    lines = [f"schedule over {total:,} steps" + (f", {spe:,} per epoch" if spe else "") + ":"]
    if ours.why_not is not None:
        lines.append(f"  {name}: not modelled ({ours.why_not})")
    else:
        lines.append(f"  {name:<24} saves {len(ours.saved):>3}: {_steps(ours.saved)}")
        lines.append(f"  {'':<24} keeps {len(ours.kept):>3}: {_steps(ours.kept)}")
    lines.append(f"  {'the policy':<24} saves {len(sim.saved_steps):>3}: {_steps(sim.saved_steps)}")
    lines.append(f"  {'':<24} keeps {len(sim.kept):>3}: {_steps(sim.kept)}")
    if ours.why_not is not None:
        return lines
    diffs = differences(name, ours, sim.saved_steps, sim.kept, total)
    if not diffs:
        lines.append("  no differences: the policy saves and keeps what the trainer does")
        return lines
    lines.append("differences:")
    lines += [f"  {d}" for d in diffs[:SHOWN_DIFFERENCES]]
    if len(diffs) > SHOWN_DIFFERENCES:
        lines.append(f"  ... and {len(diffs) - SHOWN_DIFFERENCES:,} more")
    return lines


def differences(name: str, trainer: TrainerSchedule, saved: Sequence[int], kept: Sequence[int],
                total: int) -> list[str]:
    """Each step saved by one side only, then what is kept at the end if that differs."""
    mine, theirs = set(saved), set(trainer.saved)
    out = []
    for step in sorted(mine ^ theirs):
        label = f"step {step:,}" + (" (final)" if step == total else "")
        out.append(f"{label}: saved by the policy, not by {name}" if step in mine
                   else f"{label}: saved by {name}, not by the policy")
    if list(kept) != list(trainer.kept):
        out.append(f"kept at the end: {name} {_steps(trainer.kept)}; the policy {_steps(kept)}")
    return out


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m saverules.convert", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="ARGS", help="TrainingArguments.to_json_string() output, or a saved "
                                                       "training_args.bin (read without unpickling)")
    src.add_argument("--from-lightning", metavar="CALL", help="'ModelCheckpoint(...)' with literal keyword "
                                                              "arguments (parsed, never run)")
    src.add_argument("--from-torchtitan", metavar="TOML", help="a torchtitan config with a [checkpoint] table")
    p.add_argument("--total-steps", type=_positive_int, metavar="N", help="the run's length (written to [run])")
    p.add_argument("--steps-per-epoch", type=_positive_int, metavar="N", help="the epoch length (written to [run])")
    p.add_argument("-o", "--output", metavar="FILE", help="write the policy here (default: stdout)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        draft = draft_from(args)
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    text = draft.toml()
    try:
        lines = compare(draft, text)
    except PolicyError as exc:  # a mapping that produced an invalid policy is a bug here, not the user's
        print(f"error: the converted policy is invalid, please report it:\n{exc}\n{text}", file=sys.stderr)
        return 1
    report: TextIO = sys.stdout
    if args.output is None:
        sys.stdout.write(text)
        report = sys.stderr
    else:
        try:
            with open(args.output, "w", encoding="utf-8") as f:
                f.write(text)
        except OSError as exc:
            print(f"error: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {args.output}; check it with: python -m saverules.check {args.output}", file=report)
    print("\n".join(lines), file=report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

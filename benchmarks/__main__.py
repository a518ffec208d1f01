"""``python -m benchmarks [--quick] [--only NAME ...] [--json PATH]``."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback

from . import BENCHMARKS, fmt_value


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    return info


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def render(rows) -> str:
    header = ("benchmark", "measurement", "value", "ratio", "goal", "status")
    lines = []
    for r in rows:
        ratio = f"{r.ratio:.3g}x vs {r.vs}" if r.ratio is not None else ""
        if r.met is None:
            status = ""
        else:
            status = "met" if r.met else "MISSED"
        value = fmt_value(r.value, r.unit) + (" (extrapolated)" if r.extrapolated else "")
        lines.append((r.benchmark, r.name, value, ratio, r.goal or "", status))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines]
    notes = [(r.benchmark, r.name, r.note) for r in rows if r.note]
    if notes:
        out.append("")
        out += [f"  {b} / {n}: {note}" for b, n, note in notes]
    return "\n".join(out)


def main(argv=None) -> int:
    names = [n for n, _ in BENCHMARKS]
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0].strip("`"))
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats: checks that everything runs")
    p.add_argument("--only", action="append", default=None, metavar="NAME",
                   help=f"run only this benchmark (repeatable, or comma-separated): {', '.join(names)}")
    p.add_argument("--json", metavar="PATH", help="also write every figure, with its samples, as JSON to PATH ('-' for stdout)")
    args = p.parse_args(argv)

    chosen = names
    if args.only:
        chosen = [x.strip() for item in args.only for x in item.split(",") if x.strip()]
        unknown = [x for x in chosen if x not in names]
        if unknown:
            p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(names)}")

    info = machine()
    print(f"saverules benchmarks{' (quick mode: smoke run, figures are not meaningful)' if args.quick else ''}")
    print(f"machine: {info['cores']} cores, {info['cpu']}; Python {info['python']}; torch {info['torch']}; "
          f"load average {_load()}")
    modules = dict(BENCHMARKS)
    rows = []
    failed = []
    timings = {}
    for name in chosen:
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        try:
            mod = importlib.import_module(f"{__package__}.{modules[name]}")
            got = mod.run(quick=args.quick)
        except Exception as exc:  # report and go on with the next benchmark
            traceback.print_exc()
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        timings[name] = time.perf_counter() - t0
        rows.extend(got)
        print(render(got), flush=True)
        print(f"({name}: {timings[name]:.1f} s; load average now {_load()})", flush=True)

    if len(chosen) > 1 and rows:
        print("\n== summary ==")
        print(render([r for r in rows if r.met is not None]).split("\n\n")[0])
    if args.json:
        info["load_average_end"] = _load()
        doc = {"machine": info, "quick": args.quick, "benchmarks": chosen, "seconds": timings,
               "failed": failed, "rows": [r.as_dict() for r in rows]}
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    if failed:
        print("\nfailed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

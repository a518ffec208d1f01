"""Hypothesis strategies: valid policy documents, run shapes and progress sequences.

Policies are generated as plain data (what ``tomllib`` would return), so the
same draw can be validated directly (``Policy.model_validate``) or written
out as TOML text (:func:`to_toml`) and loaded through the real loader.
"""
from __future__ import annotations

import json
import math

from hypothesis import strategies as st

from saverules import Policy, Progress

METRICS = ("val_loss", "acc")
SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP")


# -- quantities -------------------------------------------------------------------

def shares(low: float = 0.5, allow_zero: bool = False):
    """A share of the run as written in a policy: "5%", "12.5%", "100%"."""
    whole = st.integers(0 if allow_zero else 1, 100).map(lambda p: f"{p}%")
    half = st.integers(0, 199).map(lambda h: f"{h // 2}.5%")
    small = st.sampled_from(["0.1%", "0.5%", "1%", "2%", "5%", "10%", "25%", "33.3%", "50%"])
    return st.one_of(small, whole, half)


def step_counts(max_value: int = 10**6):
    """Positive step counts, dense at small values where short runs see them fire."""
    return st.one_of(st.integers(1, 12), st.integers(1, 500), st.integers(1, max_value))


def intervals(with_shares: bool, sparse: bool = False):
    """An interval: steps or a share.  ``sparse`` keeps it long enough that a run
    of 10^6 steps sees at most about a thousand firings (for simulations of long runs)."""
    counts = st.integers(1000, 10**6) if sparse else step_counts()
    return st.one_of(counts, shares()) if with_shares else counts


sparse_durations = st.integers(1, 48).map(lambda n: f"{n}h")
durations = st.one_of(
    st.builds(lambda n, u: f"{n}{u}", st.integers(1, 90), st.sampled_from("smh")),
    st.builds(lambda n: f"{n}.5s", st.integers(0, 30)),
    st.builds(lambda n: f"{n}.25m", st.integers(0, 5)),
)


@st.composite
def windows(draw, with_shares: bool):
    """after/until bounds of one kind (both step counts or both shares), in order."""
    kind = draw(st.sampled_from(["steps", "shares"] if with_shares else ["steps"]))
    which = draw(st.sampled_from(["after", "until", "both"]))
    out = {}
    if kind == "steps":
        after = draw(st.integers(0, 2000) | st.integers(0, 10**6))
        until = after + draw(st.integers(1, 2000) | st.integers(1, 10**6))
    else:
        a = draw(st.integers(0, 99))
        b = draw(st.integers(a + 1, 100))
        after, until = f"{a}%", f"{b}%"
    if which in ("after", "both"):
        out["after"] = after
    if which in ("until", "both"):
        out["until"] = until
    return out


# -- rules ------------------------------------------------------------------------

@st.composite
def piecewise_segments(draw, with_shares: bool, sparse: bool = False):
    n = draw(st.integers(1, 4))
    use_shares = with_shares and draw(st.booleans())
    if use_shares:
        cuts = sorted(set(draw(st.lists(st.integers(1, 99), min_size=n - 1, max_size=n - 1))))
        untils = [f"{c}%" for c in cuts]
    else:
        cuts = sorted(set(draw(st.lists(st.integers(1, 5000) | st.integers(1, 10**6), min_size=n - 1, max_size=n - 1))))
        untils = list(cuts)
    segments = [{"every": draw(intervals(with_shares, sparse)), "until": u} for u in untils]
    last = {"every": draw(intervals(with_shares, sparse))}
    previous = cuts[-1] if cuts else 0
    if draw(st.booleans()):  # the last segment may have an until too
        if not use_shares:
            last["until"] = previous + draw(st.integers(1, 10**5))
        elif previous < 100:
            last["until"] = f"{draw(st.integers(previous + 1, 100))}%"
    segments.append(last)
    return segments


def leaf_rules(with_shares: bool, sparse: bool = False):
    kinds = [
        st.fixed_dictionaries({"kind": st.just("every_steps"), "every": intervals(with_shares, sparse)}),
        st.fixed_dictionaries({"kind": st.just("every_time"), "every": sparse_durations if sparse else durations}),
        st.fixed_dictionaries({"kind": st.just("epoch_end")}, optional={"every": st.integers(1, 4)}),
        st.just({"kind": "final"}),
        st.fixed_dictionaries({"kind": st.just("tail"), "interval": intervals(with_shares)}),
        st.fixed_dictionaries(
            {"kind": st.just("at_steps"), "steps": st.lists(intervals(with_shares), min_size=1, max_size=5)}
        ),
        st.fixed_dictionaries({"kind": st.just("piecewise"), "segments": piecewise_segments(with_shares, sparse)}),
        st.fixed_dictionaries(
            {"kind": st.just("on_signal")},
            optional={"signals": st.lists(st.sampled_from(SIGNALS + ("TERM", "usr1")), min_size=1, max_size=3)},
        ),
        st.fixed_dictionaries(
            {"kind": st.just("improved"), "metric": st.sampled_from(METRICS)},
            optional={
                "mode": st.sampled_from(["min", "max"]),
                "min_delta": st.sampled_from([0.0, 0.01, 0.5]) | st.floats(0, 1, allow_nan=False),
                "top": st.integers(1, 4),
            },
        ),
    ]
    if not sparse:  # a window alone, or a `not`, fires at nearly every step
        kinds.append(windows(with_shares).map(lambda w: {"kind": "window", **w}))
    return st.one_of(*kinds)


def with_window(rule_strategy, with_shares: bool):
    """Sometimes add the after/until shorthand to a rule (not to window, which has its own)."""

    @st.composite
    def add(draw):
        rule = draw(rule_strategy)
        if rule["kind"] != "window" and draw(st.integers(0, 4)) == 0:
            rule = {**rule, **draw(windows(with_shares))}
        return rule

    return add()


def rules(with_shares: bool = True, max_leaves: int = 6, sparse: bool = False):
    leaf = with_window(leaf_rules(with_shares, sparse), with_shares)

    def combine(children):
        options = [
            st.fixed_dictionaries(
                {"kind": st.sampled_from(["all", "any"]), "rules": st.lists(children, min_size=1, max_size=3)}
            )
        ]
        if not sparse:
            options.append(st.fixed_dictionaries({"kind": st.just("not"), "rule": children}))
        return st.one_of(*options)

    return st.recursive(leaf, combine, max_leaves=max_leaves)


def step_rules():
    """A small vocabulary of rules that fire by crossing, with short intervals, nested in
    all / any / not: where jumps, windows and combinators interact the most."""
    small = st.integers(1, 9)
    leaf = st.one_of(
        st.fixed_dictionaries({"kind": st.just("every_steps"), "every": small}),
        st.fixed_dictionaries({"kind": st.just("at_steps"), "steps": st.lists(st.integers(1, 40), min_size=1, max_size=4)}),
        st.builds(
            lambda a, b, c, u: {"kind": "piecewise", "segments": [{"every": a, "until": u}, {"every": b, "until": u + c}, {"every": a + b}]},
            small, small, st.integers(1, 20), st.integers(1, 20),
        ),
        st.builds(lambda a, n: {"kind": "window", "after": a, "until": a + n}, st.integers(0, 30), st.integers(1, 20)),
        st.just({"kind": "final"}),
        st.fixed_dictionaries({"kind": st.just("tail"), "interval": st.integers(1, 30)}),
    )
    leaf = st.one_of(leaf, st.builds(lambda r, a: {**r, "after": a}, leaf.filter(lambda r: r["kind"] != "window"), st.integers(0, 30)))
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.fixed_dictionaries({"kind": st.just("all"), "rules": st.lists(children, min_size=2, max_size=3)}),
            st.fixed_dictionaries({"kind": st.just("any"), "rules": st.lists(children, min_size=1, max_size=3)}),
            st.fixed_dictionaries({"kind": st.just("not"), "rule": children}),
        ),
        max_leaves=5,
    )


@st.composite
def step_policy_docs(draw):
    return {
        "version": 1,
        "final": draw(st.booleans()),
        "rules": draw(st.lists(step_rules(), min_size=1, max_size=3)),
    }


retentions = st.fixed_dictionaries(
    {},
    optional={
        "keep_last": st.integers(1, 5),
        "keep_every": st.integers(1, 50) | st.integers(1, 10**5),
        "keep_best": st.fixed_dictionaries(
            {"metric": st.sampled_from(METRICS)},
            optional={"mode": st.sampled_from(["min", "max"]), "n": st.integers(1, 3)},
        ),
    },
)


@st.composite
def policy_docs(
    draw, with_shares: bool = True, final: bool | None = None, max_rules: int = 4, run: bool = False,
    sparse: bool = False,
):
    """A valid policy as plain data (``sparse``: one that fires rarely on long runs)."""
    doc = {"version": 1}
    f = draw(st.booleans()) if final is None else final
    if f is not True or draw(st.booleans()):
        doc["final"] = f
    if run and draw(st.booleans()):
        doc["run"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "total_steps": st.integers(1, 10**6),
                    "steps_per_epoch": st.integers(1, 10**5),
                    "step_seconds": st.floats(0.01, 100, allow_nan=False),
                },
            )
        )
    doc["rules"] = draw(st.lists(rules(with_shares, sparse=sparse), min_size=0, max_size=max_rules))
    if draw(st.booleans()):
        doc["retention"] = draw(retentions)
    if draw(st.integers(0, 3)) == 0:
        doc["storage"] = draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "dir": st.sampled_from(["checkpoints", "out/ckpt", "/tmp/x"]),
                    "name": st.sampled_from(["step-{step:08d}", "{run}-{step}", "e{epoch}-s{step:06d}", "{step}-{time}"]),
                    "format": st.sampled_from(["tensors", "torch", "safetensors"]),
                },
            )
        )
    return doc


def policies(**kwargs):
    return policy_docs(**kwargs).map(Policy.model_validate)


def has_shares(doc) -> bool:
    return "%" in json.dumps(doc.get("rules", []))


# -- TOML text ----------------------------------------------------------------------

def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value).__name__)


def _key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) and k.isascii() else json.dumps(k)


def to_toml(doc: dict) -> str:
    """A policy document as TOML text, one key per line, rules as [[rules]] tables."""
    lines = []
    tables = []
    for k, v in doc.items():
        if k == "rules" and isinstance(v, list) and all(isinstance(r, dict) for r in v):
            tables.append(("rules", v))
        elif isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{_key(k)} = {toml_value(v)}")
    for name, body in tables:
        if name == "rules":
            for rule in body:
                lines.append("")
                lines.append("[[rules]]")
                lines.extend(f"{_key(k)} = {toml_value(v)}" for k, v in rule.items())
        else:
            lines.append("")
            lines.append(f"[{_key(name)}]")
            lines.extend(f"{_key(k)} = {toml_value(v)}" for k, v in body.items())
    return "\n".join(lines) + "\n"


# -- runs ---------------------------------------------------------------------------

signals = st.one_of(
    st.just(False),
    st.just(True),
    st.sampled_from(SIGNALS + ("TERM", "sigusr1", "SIGQUIT")),
    st.sampled_from([15, 10, 2, 1, 12, 3]),
)


def metric_reports():
    value = st.floats(-10, 10, allow_nan=False) | st.sampled_from([0.0, 1.0, 1.0, 0.5])
    return st.one_of(
        st.just({}),
        st.fixed_dictionaries({}, optional={m: value for m in METRICS}),
        st.fixed_dictionaries({"val_loss": value}),
    )


@st.composite
def progress_sequences(draw, total: int | None, max_len: int = 40, note_saves: bool = True):
    """A run as the decider sees it: non-decreasing steps (single steps, jumps,
    repeats), epochs, an irregular clock, signals, metrics, is_last, and the
    occasional save the loop made on its own (``("note_save", step, time)``)."""
    n = draw(st.integers(1, max_len))
    span = total if total is not None else 10**6
    step = draw(st.integers(0, 3) | st.integers(0, max(0, span)))
    clock = draw(st.sampled_from(["none", "regular", "irregular"]))
    t = draw(st.floats(0, 1000, allow_nan=False))
    dt = draw(st.floats(0.001, 600, allow_nan=False))
    epoch = 0
    out = []
    switch_at = draw(st.integers(0, 3 * n))  # sometimes the run's length changes (a resume with a new total)
    for i in range(n):
        if i == switch_at and total is not None:
            total = draw(st.integers(1, max(1, 2 * step)) | st.integers(1, 10**6))
        jump = draw(
            st.one_of(
                st.just(1), st.just(1), st.integers(0, 3), st.integers(1, 50), st.integers(1, max(1, span // 4))
            )
        )
        step = max(step + jump, 1)
        if clock == "regular":
            t += dt * max(jump, 1)
        elif clock == "irregular":
            t += draw(st.floats(0, 3600, allow_nan=False) | st.just(0.0) | st.floats(0, 2, allow_nan=False))
        time = None if clock == "none" or (clock == "irregular" and draw(st.integers(0, 9)) == 0) else t
        epoch_end = draw(st.integers(0, 4)) == 0
        last = i == n - 1
        is_last = draw(st.sampled_from([None, True])) if last else draw(st.sampled_from([None, None, None, False]))
        out.append(
            Progress(
                step=step,
                total_steps=total if draw(st.integers(0, 5)) else None,
                epoch=epoch,
                epoch_end=epoch_end,
                is_last=is_last,
                time=time,
                metrics=draw(metric_reports()) if draw(st.integers(0, 3)) == 0 else None,
                signal=draw(signals) if draw(st.integers(0, 7)) == 0 else False,
            )
        )
        if epoch_end:
            epoch += 1
        if note_saves and draw(st.integers(0, 12)) == 0:
            out.append(("note_save", step, time))
    return out


def replay(decider, items):
    """Feed a generated sequence to an engine decider; the saves as [(step, reasons)]."""
    saves = []
    for item in items:
        if isinstance(item, tuple):
            decider.note_save(item[1], item[2])
            continue
        d = decider(item)
        if d.save:
            saves.append((item.step, d.reasons))
    return saves


@st.composite
def metric_functions(draw):
    """A deterministic step -> metrics callable for simulations (or None)."""
    if draw(st.booleans()):
        return None
    every = draw(st.integers(1, 50))
    values = draw(st.lists(st.floats(-5, 5, allow_nan=False) | st.sampled_from([1.0, 0.5]), min_size=1, max_size=8))
    names = draw(st.sampled_from([("val_loss",), ("acc",), METRICS]))

    return _Metrics(every, tuple(values), names)


class _Metrics:
    """step -> metrics, reported every ``every`` steps (a readable repr for failing examples)."""

    def __init__(self, every, values, names):
        self.every, self.values, self.names = every, values, names

    def __call__(self, step):
        if step % self.every:
            return None
        return {name: self.values[(step // self.every + k) % len(self.values)] for k, name in enumerate(self.names)}

    def __repr__(self):
        return f"_Metrics(every={self.every}, values={self.values}, names={self.names})"


@st.composite
def two_tier_docs(draw, max_rules: int = 2):
    """A valid policy with a ``[durable]`` table, as plain data (no shares of the run)."""
    doc = draw(policy_docs(with_shares=False, max_rules=max_rules))
    durable: dict = {"rules": draw(st.lists(rules(False), max_size=max_rules))}
    if draw(st.booleans()):
        durable["final"] = draw(st.booleans())
    if draw(st.booleans()):
        durable["retention"] = draw(retentions)
    doc["durable"] = durable
    return doc

"""Load-time validation: every problem is a PolicyError whose diagnostics point into the
document, at the offending key (or the [[rules]] header when a key is missing)."""
from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import policy_docs, to_toml

import saverules
from saverules import PolicyError, loads


def diagnose(text, source="p.toml"):
    with pytest.raises(PolicyError) as err:
        loads(text, source)
    assert isinstance(err.value, ValueError)
    return err.value.diagnostics


def where(text: str, needle: str, nth: int = 0):
    """(line, col) of the nth occurrence of ``needle`` in ``text``."""
    offset = -1
    for _ in range(nth + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


def one(text, needle=None, nth=0, contains=()):
    """The single diagnostic for ``text``: at ``needle``, with every phrase of ``contains``."""
    diags = diagnose(text)
    assert len(diags) == 1, diags
    (d,) = diags
    assert d.source == "p.toml"
    if needle is not None:
        assert (d.line, d.col) == where(text, needle, nth), (d, where(text, needle, nth))
    for phrase in contains:
        assert phrase in d.message, d.message
    assert str(d).startswith(f"p.toml:{d.line}:{d.col}: error: ")
    return d


RULE = 'version = 1\n\n[[rules]]\nkind = "every_steps"\n'


# -- positions --------------------------------------------------------------------------------


def test_a_bad_value_points_at_its_key():
    text = RULE + "every = -5\n"
    one(text, "every =", contains=("rules[0].every", "at least 1"))


def test_a_bad_value_in_an_inline_table_points_inside_the_line():
    text = 'version = 1\n[[rules]]\nkind = "all"\nrules = [{ kind = "every_steps", every = 10 }, { kind = "window", after = -1 }]\n'
    one(text, "after", contains=("rules[0].rules[1].after",))


def test_the_second_rules_table_is_located():
    text = RULE + "every = 5\n\n[[rules]]\nkind = \"tail\"\ninterval = 0\n"
    one(text, "interval", contains=("rules[1].interval", "remove it"))


def test_a_missing_key_points_at_the_rules_header():
    text = 'version = 1\nfinal = true\n\n[[rules]]\nkind = "every_steps"\n\n[[rules]]\nkind = "tail"\n'
    diags = diagnose(text)
    assert [(d.line, d.col) for d in diags] == [where(text, "[[rules]]"), where(text, "[[rules]]", 1)]
    assert "missing required key 'every'" in diags[0].message
    assert "missing required key 'interval'" in diags[1].message


def test_a_rule_without_kind():
    one('version = 1\n[[rules]]\nevery = 5\n', "[[rules]]", contains=("no `kind`",))


def test_missing_version():
    one('final = true\n', contains=("version = 1",))


@pytest.mark.parametrize("value", ["2", "true", '"1"', "1.0"])
def test_wrong_version(value):
    one(f"version = {value}\n", "version", contains=("version",))


def test_toml_syntax_errors_have_a_position():
    text = 'version = 1\n[[rules]]\nkind = "every_steps\nevery = 5\n'
    d = one(text, contains=("TOML syntax",))
    assert d.line == 3
    d = one("version = 1\nfinal = \n", contains=("TOML syntax",))
    assert d.line == 2
    d = one("version = 1\n[run\n", contains=("TOML syntax",))
    assert d.line == 2


def test_non_utf8_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b'version = 1\n# caf\xe9\n')
    with pytest.raises(PolicyError) as err:
        saverules.load(path)
    (d,) = err.value.diagnostics
    assert (d.source, d.line, d.col) == (str(path), 2, 6) and "UTF-8" in d.message


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError) as err:
        saverules.load(tmp_path / "nope.toml")
    (d,) = err.value.diagnostics
    assert d.source.endswith("nope.toml") and "cannot read" in d.message


# -- kinds, keys and types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,suggestion", [("every_step", "every_steps"), ("evry_time", "every_time"), ("epochend", "epoch_end"),
                        ("improve", "improved"), ("tails", "tail")]
)
def test_unknown_kind_suggests_the_closest(kind, suggestion):
    text = f'version = 1\n[[rules]]\nkind = "{kind}"\nevery = 5\n'
    d = one(text, "kind", contains=(f"unknown rule kind {kind!r}", f"did you mean {suggestion!r}"))
    assert "every_steps" in d.message  # the valid kinds are listed


def test_unknown_key_suggests_the_closest():
    one(RULE + "every = 5\nevry = 6\n", "evry", contains=("unknown key 'evry'", "did you mean 'every'"))
    one('version = 1\n[retention]\nkeep_lst = 2\n', "keep_lst", contains=("did you mean 'keep_last'",))


@pytest.mark.parametrize(
    "value,phrase",
    [
        ('"5"', "write numbers without quotes"),
        ("true", "got a boolean"),
        ("5.0", "got a float"),
        ("inf", "got a float"),
        ("nan", "got a float"),
        ("[5]", "got an array"),
        ("{ n = 5 }", "got a table"),
        ("0", "to disable a rule, remove it"),
        ('"0%"', "to disable a rule, remove it"),
        ('"150%"', "at most 100%"),
        ('"5 percent"', "share of the run"),
        ("-3", "at least 1"),
    ],
)
def test_every_steps_is_strictly_typed(value, phrase):
    one(RULE + f"every = {value}\n", "every =", contains=(phrase,))


@pytest.mark.parametrize(
    "value,phrase",
    [
        ("5", "needs a unit"),
        ('"5"', "needs a unit"),
        ("2.5", "needs a unit"),
        ("true", "boolean"),
        ('"0s"', "remove it"),
        ('"5 minutes"', "units s, m, h"),
        ('"5d"', "units s, m, h"),
        ('"-5m"', "units s, m, h"),
    ],
)
def test_every_time_needs_a_duration_with_a_unit(value, phrase):
    one(f'version = 1\n[[rules]]\nkind = "every_time"\nevery = {value}\n', "every =", contains=(phrase,))


def test_bare_number_duration_says_what_to_write():
    d = one('version = 1\n[[rules]]\nkind = "every_time"\nevery = 30\n', "every =")
    assert '"30s"' in d.message and '"30m"' in d.message and "unit" in d.message


@pytest.mark.parametrize(
    "key,value,phrase",
    [
        ("min_delta", "nan", "inf and nan"),
        ("min_delta", "inf", "inf and nan"),
        ("min_delta", "-0.5", "at least 0"),
        ("min_delta", '"0.1"', "expected a number"),
        ("mode", '"minimum"', "min"),
        ("metric", '""', "must not be empty"),
        ("metric", "3", "string"),
    ],
)
def test_improved_fields(key, value, phrase):
    base = {"metric": '"loss"', "mode": '"min"', "min_delta": "0.0"}
    base[key] = value
    text = 'version = 1\n[[rules]]\nkind = "improved"\n' + "".join(f"{k} = {v}\n" for k, v in base.items())
    one(text, f"{key} =", contains=(phrase,))


@pytest.mark.parametrize(
    "table,phrase",
    [
        ("[run]\nstep_seconds = inf\n", "inf and nan"),
        ("[run]\nstep_seconds = 0\n", "more than 0"),
        ("[run]\ntotal_steps = 0\n", "remove it"),
        ("[run]\ntotal_steps = 1e3\n", "float"),
        ("[retention]\nkeep_last = 0\n", "at least 1"),
        ("[retention]\nkeep_best = { metric = \"loss\", n = 0 }\n", "at least 1"),
        ("[retention]\nkeep_best = \"loss\"\n", "expected a table"),
        ("[storage]\nformat = \"pickle\"\n", "torch"),
        ("final = \"yes\"\n", "true or false"),
    ],
)
def test_other_tables(table, phrase):
    d = one("version = 1\n" + table)
    assert d.line == table.count("\n") + 1 or "final" in table
    assert phrase in d.message


def test_every_known_error_is_reported_at_once():
    text = RULE + "every = 0\n\n[[rules]]\nkind = \"tail\"\ninterval = true\n\n[retention]\nkeep_last = -1\n"
    diags = diagnose(text)
    assert [d.line for d in diags] == [where(text, "every =")[0], where(text, "interval")[0], where(text, "keep_last")[0]]


# -- order of bounds and segments --------------------------------------------------------------------


@pytest.mark.parametrize("after,until", [("10", "3"), ("10", "10"), ('"10%"', '"3%"'), ('"5%"', '"5.0%"')])
def test_until_before_after_points_at_until(after, until):
    one(RULE + f"every = 5\nafter = {after}\nuntil = {until}\n", "until", contains=("until", "greater than after"))


def test_window_needs_a_bound():
    one('version = 1\n\n[[rules]]\nkind = "window"\n', "[[rules]]", contains=("after", "until"))


@pytest.mark.parametrize(
    "segments,needle,phrase",
    [
        ("[{ every = 1, until = 10 }, { every = 2, until = 10 }]", "segments", "increasing"),
        ("[{ every = 1, until = 10 }, { every = 2, until = 5 }, { every = 3 }]", "segments", "increasing"),
        ('[{ every = 1, until = "50%" }, { every = 2, until = "20%" }]', "segments", "increasing"),
        ("[{ every = 1 }, { every = 2, until = 5 }]", "segments", "only the last segment"),
        ("[]", "segments", "must not be empty"),
        ("[{ every = 0 }]", "every = 0", "remove it"),  # inside the inline table
        ("[{ every = 1, unti = 5 }]", "unti", "did you mean 'until'"),
    ],
)
def test_piecewise_segments(segments, needle, phrase):
    one(f'version = 1\n[[rules]]\nkind = "piecewise"\nsegments = {segments}\n', needle, contains=(phrase,))


def test_segments_of_mixed_kinds_are_checked_when_the_total_is_known():
    text = 'version = 1\n[[rules]]\nkind = "piecewise"\nsegments = [{ every = 1, until = 500 }, { every = 2, until = "10%" }]\n'
    loads(text).compile(10_000)
    with pytest.raises(PolicyError, match="increasing"):
        loads(text).compile(1000)


# -- storage names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,phrase",
    [
        ("../{step}", "plain directory name"),
        ("{step}/../x", "plain directory name"),
        ("/abs/{step}", "plain directory name"),
        ("..{step}", "plain directory name"),
        (".hidden-{step}", "plain directory name"),
        ("~{step}", "plain directory name"),
        ("{run}", "must contain {step}"),
        ("{step}-{user}", "unknown placeholder {user}"),
        ("{step.real}", "unknown placeholder"),
        ("{step:99999999}", "width"),
        ("{step", "not a valid name template"),
        ("{step:q}", "does not render"),
        ("{time:%Y/%m}-{step}", "plain directory name"),
        ("", "must not be empty"),
    ],
)
def test_storage_name_templates_stay_inside_dir(name, phrase):
    text = f'version = 1\n[storage]\ndir = "ckpt"\nname = "{name}"\n'
    one(text, "name", contains=(phrase,))


def test_storage_names_render():
    p = loads('version = 1\n[storage]\nname = "{run}-e{epoch}-s{step:06d}"\n')
    assert p.storage.render_name(42, epoch=3, run="exp") == "exp-e3-s000042"
    with pytest.raises(ValueError):
        p.storage.render_name(1, run="a/b")


# -- the mutation property ---------------------------------------------------------------------------

WRONG_VALUES = [
    '"5"', "true", "false", "-1", "0", "-0.5", "1.5", "inf", "-inf", "nan", "[]", "[1, 2]", "{}", "{ a = 1 }",
    '""', '"5%"', '"-1%"', '"0%"', '"101%"', '"30m"', '"5"', '"every_step"', "99999999999999999999999",
    "1979-05-27", '"SIGKILL"', '"min"', "'x'", '"{step}"', '"../{step}"',
    "1" + "0" * 400, '"1' + "0" * 400 + 's"', '"{step:999999999}"',  # too large for a float or a name
]
GARBAGE = ["\x00", "\xff", "[[", "]]", "[", "=", '"', "'''", "{", "}", "\\", "\n[[rules]]\n", "\n[rules]\n", "#", "\t",
           "\u2028", "\r", ",", "é", "\ud800"]


@st.composite
def mutants(draw):
    """A valid document, mutated; and the lines of the table the mutation touched (or None)."""
    text = to_toml(draw(policy_docs(run=True)))
    lines = text.split("\n")
    kind = draw(st.sampled_from(["value", "unknown_key", "delete", "garbage", "truncate", "duplicate", "swap"]))
    touched = None
    if kind == "value":
        keyed = [i for i, line in enumerate(lines) if " = " in line]
        if keyed:
            i = draw(st.sampled_from(keyed))
            key = lines[i].split(" = ", 1)[0]
            lines[i] = f"{key} = {draw(st.sampled_from(WRONG_VALUES))}"
            touched = _table_span(lines, i)
    elif kind == "unknown_key":
        i = draw(st.integers(0, len(lines)))
        lines.insert(i, f"{draw(st.sampled_from(['evry', 'foo', 'keep', 'step', 'kinds']))} = 1")
        touched = _table_span(lines, i)
    elif kind == "delete":
        del lines[draw(st.integers(0, len(lines) - 1))]
    elif kind == "duplicate":
        i = draw(st.integers(0, len(lines) - 1))
        lines.insert(i, lines[i])
    elif kind == "swap":
        i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
        lines[i], lines[j] = lines[j], lines[i]
    mutant = "\n".join(lines)
    if kind == "garbage":
        for _ in range(draw(st.integers(1, 3))):
            at = draw(st.integers(0, len(mutant)))
            junk = draw(st.sampled_from(GARBAGE) | st.text(max_size=4))
            mutant = mutant[:at] + junk + mutant[at:]
    elif kind == "truncate":
        mutant = mutant[: draw(st.integers(0, len(mutant)))]
    as_bytes = draw(st.booleans())
    if as_bytes:
        data = mutant.encode("utf-8", "surrogatepass")
        if kind == "garbage" and draw(st.booleans()):
            at = draw(st.integers(0, len(data)))
            data = data[:at] + draw(st.binary(min_size=1, max_size=3)) + data[at:]
        return data, touched
    return mutant, touched


def _table_span(lines, i):
    """1-based (first, last) lines of the table that line i (0-based) belongs to."""
    start = 0
    for j in range(i, -1, -1):
        if j < len(lines) and lines[j].startswith("["):
            start = j
            break
    end = len(lines) - 1
    for j in range(i + 1, len(lines)):
        if lines[j].startswith("["):
            end = j - 1
            break
    return start + 1, end + 1


@given(mutants())
def test_mutated_documents_load_or_raise_policy_error_inside_the_document(case):
    mutant, touched = case
    text = mutant.decode("utf-8", "replace") if isinstance(mutant, bytes) else mutant
    n_lines = (mutant.count(b"\n") if isinstance(mutant, bytes) else mutant.count("\n")) + 1
    try:
        policy = loads(mutant, "m.toml")
    except PolicyError as err:
        assert err.diagnostics
        for d in err.diagnostics:
            assert d.source == "m.toml"
            assert 1 <= d.line <= n_lines, (d, n_lines)
            assert d.col >= 1 and d.message
        if touched is not None and not re.search(r"TOML syntax|UTF-8|version", str(err)):
            # a wrong value or an unknown key is reported in the table it is in
            assert any(touched[0] <= d.line <= touched[1] for d in err.diagnostics), (err, touched, text)
        return
    # a mutant that loads is usable: deciding raises nothing but PolicyError
    total = policy.run.total_steps if policy.run and policy.run.total_steps else 1000
    try:
        decider = policy.compile(total)
        decider(saverules.Progress(1, total))
        decider(saverules.Progress(total, total))
    except PolicyError:
        pass


@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_input_raises_only_policy_error(data):
    try:
        loads(data, "x")
    except PolicyError as err:
        assert all(1 <= d.line <= (data.count(b"\n" if isinstance(data, bytes) else "\n") + 1) for d in err.diagnostics)


def test_deeply_nested_rules_are_a_policy_error():
    inner = '{ kind = "every_steps", every = 1 }'
    for _ in range(400):
        inner = f'{{ kind = "not", rule = {inner} }}'
    try:
        loads(f'version = 1\n[[rules]]\nkind = "not"\nrule = {inner}\n')
    except PolicyError as err:
        assert all(d.line >= 1 for d in err.diagnostics)


# -- limits: size, nesting, rule count, step counts; the byte order mark -----------------------


def _nested_nots(depth: int) -> str:
    """``depth`` nested `not`s, the outermost a [[rules]] table."""
    inner = '{ kind = "every_steps", every = 1 }'
    for _ in range(depth - 1):
        inner = f'{{ kind = "not", rule = {inner} }}'
    return f'version = 1\n[[rules]]\nkind = "not"\nrule = {inner}\n'


def test_a_utf8_byte_order_mark_is_accepted():
    text = 'version = 1\n[[rules]]\nkind = "every_steps"\nevery = 10\n'
    for given in ("\ufeff" + text, b"\xef\xbb\xbf" + text.encode()):
        assert loads(given).rules[0].every == 10
    # positions are those of the text an editor shows, without the mark
    (d,) = diagnose('\ufeffversion = 1\n[[rules]]\nkind = "every_steps"\nevery = 0\n')
    assert (d.line, d.col) == (4, 1)


def test_nesting_deeper_than_the_limit_names_the_depth_not_a_recursion_error():
    for depth in (65, 300, 400, 5000):
        (d,) = diagnose(_nested_nots(depth))
        assert d.message.startswith(f"tables and arrays are nested {depth} levels deep here; the limit is 64")
        assert "recursion" not in d.message and "rule.rule" not in d.message
        assert d.line == 4  # where the too-deep table opens
    assert len(loads(_nested_nots(64)).rules) == 1


def test_nesting_through_table_headers_has_a_readable_key_path():
    depth = 300  # tables below the top-level [[rules]] table, as brackets count
    text = 'version = 1\n[[rules]]\nkind = "not"\n' + "".join(
        f'[rules{".rule" * i}]\nkind = "not"\n' for i in range(1, depth)) + f'[rules{".rule" * depth}]\nkind = "final"\n'
    (d,) = diagnose(text)
    assert d.message.startswith("rules[0](.rule x65): tables and arrays are nested 300 levels deep here")
    assert len(d.message) < 200


def test_errors_deep_inside_allowed_nesting_have_a_compact_key_path():
    inner = '{ kind = "every_steps", every = 0 }'
    for _ in range(40):
        inner = f'{{ kind = "not", rule = {inner} }}'
    (d,) = diagnose(f'version = 1\n[[rules]]\nkind = "not"\nrule = {inner}\n')
    assert d.message.startswith("rules[0](.rule x41).every: must be at least 1")
    inner = '{ kind = "every_steps", every = 0 }'
    for _ in range(10):
        inner = f'{{ kind = "all", rules = [{inner}] }}'
    (d,) = diagnose(f'version = 1\n[[rules]]\nkind = "any"\nrules = [{inner}]\n')
    assert d.message.startswith("rules[0](.rules[0] x11).every: must be at least 1")


def test_brackets_inside_strings_and_comments_do_not_count_as_nesting():
    deep = "[" * 100 + "{" * 100
    text = f'version = 1\n# {deep}\n[storage]\ndir = "{deep}"\nname = \'\'\'{deep}{{step}}\'\'\'\n'
    assert loads(text).storage.dir == deep


def test_a_file_over_1_mib_is_refused_without_reading_it_whole(tmp_path):
    path = tmp_path / "big.toml"
    path.write_text("version = 1\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(PolicyError) as err:
        saverules.load(path)
    (d,) = err.value.diagnostics
    assert (d.source, d.line, d.col) == (str(path), 1, 1)
    assert d.message.startswith(f"the policy is {path.stat().st_size:,} bytes long; the limit is 1,048,576 bytes")
    with pytest.raises(PolicyError, match="the limit is 1,048,576 characters"):
        loads("version = 1\n" + "#" * (1 << 20))
    at_limit = 'version = 1\n[[rules]]\nkind = "final"\n'
    at_limit += "#" * ((1 << 20) - len(at_limit))
    assert len(at_limit.encode()) == 1 << 20 and loads(at_limit).rules


def test_more_rules_than_the_limit_is_an_error_at_the_first_rule_beyond():
    rule = '[[rules]]\nkind = "every_steps"\nevery = 7\n'
    assert len(loads("version = 1\n" + rule * 10_000).rules) == 10_000
    text = "version = 1\n" + rule * 10_001
    (d,) = diagnose(text)
    assert d.message == "rules[10000]: the policy has 10,001 rules (nested rules included); the limit is 10,000"
    assert (d.line, d.col) == (2 + 3 * 10_000, 1)
    nested = '[[rules]]\nkind = "any"\nrules = [' + ", ".join(['{ kind = "final" }'] * 5000) + "]\n"
    (d,) = diagnose("version = 1\n" + nested + nested + '[[rules]]\nkind = "final"\n')
    assert d.message.startswith("rules[1]: the policy has 10,003 rules (nested rules included)")  # 5,001 each


def test_step_counts_beyond_2_63_minus_1_are_errors_at_the_key():
    big = (1 << 63)
    one('version = 1\n[[rules]]\nkind = "every_steps"\nevery = %d\n' % big, needle="every =",
        contains=["must be at most 9,223,372,036,854,775,807 (2^63-1)"])
    one('version = 1\n[run]\nsteps_per_epoch = %d\n' % big, needle="steps_per_epoch",
        contains=["must be at most"])
    assert loads('version = 1\n[[rules]]\nkind = "at_steps"\nsteps = [%d]\n' % (big - 1)).rules[0].steps == (big - 1,)


@pytest.mark.parametrize("value, named", [("5", "an integer 5"), ("true", "a boolean True"),
                                          ('["every_steps"]', "an array ['every_steps']"), ("1.5", "a float 1.5")])
def test_a_kind_that_is_not_a_string_says_so_and_lists_the_kinds(value, named):
    one(f"version = 1\n[[rules]]\nkind = {value}\n", needle="kind =",
        contains=[f"rules[0].kind: kind must be a string, got {named}", "every_steps, every_time, epoch_end"])

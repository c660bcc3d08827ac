"""Property-based fuzzing of the config loader and the override parser (ms_ray/config.py):
`load_config` and `load_serve_file` on arbitrary bytes (binary, invalid UTF-8, YAML syntax
errors, YAML that PyYAML's constructors choke on, non-mapping tops, deep nesting, mutations of
the shipped files) and `apply_override` on arbitrary `dotted.key=value` strings, against each
config class. Properties: the only exception that escapes is ConfigError, whose message names
the file or the override; valid values of known int fields round-trip; out-of-range ones are
refused naming the field.

Deterministic (derandomize=True, no example database): the same examples on every run."""

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ms_ray.config import (
    ConfigError,
    DemoConfig,
    PrepareConfig,
    ServeConfig,
    TrainConfig,
    apply_override,
    load_config,
    load_serve_file,
)

ROOT = Path(__file__).resolve().parents[1]
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                   HealthCheck.data_too_large, HealthCheck.large_base_example,
                                   HealthCheck.filter_too_much])
# name -> (class, shipped file, check_paths); "serve" goes through load_serve_file
CASES = {
    "demo": (DemoConfig, ROOT / "jobs/demo.yaml", True),
    "train": (TrainConfig, ROOT / "jobs/tiny.yaml", False),
    "prepare": (PrepareConfig, ROOT / "jobs/data-skills.yaml", True),
    "serve": (ServeConfig, ROOT / "serve/local.yaml", False),
}
HUGE = 10**40  # far beyond int64, well within what YAML and Python read
# int fields: case -> [(dotted field, values valid in the shipped file, (lowest, highest) the field allows)]
ANY, POSITIVE, NATURAL = st.integers(-HUGE, HUGE), st.integers(1, HUGE), st.integers(0, HUGE)
INT_FIELDS = {
    "demo": [("model.hidden_size", POSITIVE.map(lambda k: 4 * k), (1, None)),  # a multiple of num_heads (4)
             ("model.num_layers", POSITIVE, (1, None)), ("model.seed", ANY, (None, None)),
             ("decode.max_new_rows", POSITIVE, (1, None)), ("decode.seed", ANY, (None, None))],
    "train": [("model.hidden_size", POSITIVE.map(lambda k: 8 * k), (1, None)),  # num_heads 8
              ("optim.max_steps", st.integers(101, HUGE), (1, None)),  # longer than warmup (100 steps)
              ("optim.warmup_steps", st.integers(0, 3399), (0, None)),  # shorter than max_steps (3400)
              ("checkpoint.every", POSITIVE, (1, None)), ("scaling.num_workers", POSITIVE, (1, None)),
              ("data.batch_size", POSITIVE, (1, None)), ("eval.examples_per_task", NATURAL, (0, None)),
              ("seed", ANY, (None, None))],
    "prepare": [("seed", ANY, (None, None)), ("packing.max_rows", POSITIVE, (1, None))],
    "serve": [("port", st.integers(0, 65535), (0, 65535)), ("session.max_rows", POSITIVE, (1, None)),
              ("ingress.max_frame_bytes", POSITIVE, (1, None)), ("ingress.retry_after_s", POSITIVE, (1, None)),
              ("model.max_sessions_per_replica", POSITIVE, (1, None))],
}


def load(case: str, path, overrides=()):
    cls, _, check_paths = CASES[case]
    if case == "serve":
        return load_serve_file(path, list(overrides), check_paths=check_paths)[0]
    return load_config(cls, path, list(overrides), check_paths=check_paths)


def field_paths(cls: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted field name of a config class (sections and leaves, by their YAML names)."""
    paths = []
    for name, info in cls.model_fields.items():
        dotted = prefix + (info.alias or name)
        paths.append(dotted)
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            paths += field_paths(info.annotation, dotted + ".")
    return paths


def value_of(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def expect_config_error_or(case: str, call, names: list[str]):
    """Run `call`; it returns a config of the case's class or raises a ConfigError whose message
    names one of `names` (the file, an override). Any other exception fails the test."""
    try:
        cfg = call()
    except ConfigError as e:
        message = str(e)
        assert message and any(n in message for n in names), (message, names)
        return None
    assert isinstance(cfg, CASES[case][0])
    return cfg


# ---- YAML text -------------------------------------------------------------------------------
# Scalars PyYAML's constructors fail on in ways other than YAMLError (dates out of range, bad
# tags, timestamps), numbers Python will not read, anchors, tags, and YAML punctuation.
ATOMS = ["2020-13-45", "2020-02-30", "2001-12-14t21:59:43.10-99:00", "!!int abc", "!!float abc", "!!bool x",
         "!!timestamp x", "!!binary ab=", "!!python/object:os.system x", "!!set {a}", "&a [*a]", "*nowhere",
         "<<: 5", "9" * 4301, "-" + "9" * 5000, "1e999", ".nan", "-.inf", "0x1F", "0o17", "017", "1_000", "~",
         "null", "yes", "On", "[1", "{a: 1", "]", "}", ": ", "- ", "? ", "!", "&", "*", "|", ">", "%YAML 1.2",
         "---", "...", "'", '"', "\t", "\\", "#", "\ufeff", "\x00", "\x85", "\u2028", "a" * 300, "é", "😀",
         '"\\ud800"', '"\\ud83d\\ude00"', '"\\U0001F600"', '"\\x00"']  # escapes: a lone and a split surrogate pair
atoms = st.sampled_from(ATOMS)
# nesting: shallow, or 700 levels (deeper than Python's recursion limit lets PyYAML go; PyYAML
# scans flow nesting in quadratic time, so no deeper: 700 levels already take ~0.1 s)
deep = st.one_of(st.integers(1, 40), st.just(700)).flatmap(lambda n: st.sampled_from(
    ["[" * n, "[" * n + "]" * n, "{a: " * n + "1" + "}" * n, "- " * n + "x"]))
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
yaml_values = st.one_of(atoms, deep, st.text(max_size=16),
                        json_like.map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip()))


@st.composite
def mutated(draw, base: str) -> bytes:
    """The shipped file with a few edits: inserts of YAML values and punctuation, deletions,
    and now and then raw bytes that are not UTF-8."""
    text = base
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        if draw(st.booleans()):
            text = text[:at] + draw(st.one_of(atoms, st.text(max_size=6), yaml_values)) + text[at:]
        else:
            text = text[:at] + text[at + draw(st.integers(1, 40)):]
    data = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=4)) + data[at:]
    return data


serve_trees = st.fixed_dictionaries({}, optional={  # Serve config files of any shape
    "applications": st.one_of(json_like, st.lists(st.one_of(json_like, st.fixed_dictionaries(
        {}, optional={"args": st.one_of(json_like, st.just({"checkpoint": "x"})), "name": json_like,
                      "route_prefix": json_like})), max_size=2)),
    "http_options": st.one_of(json_like, st.fixed_dictionaries({}, optional={"host": json_like, "port": json_like})),
}).map(lambda tree: yaml.safe_dump(tree).encode())


def file_bytes(case: str):
    base = CASES[case][1].read_text()
    return st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        mutated(base),
        yaml_values.map(lambda v: v.encode("utf-8", "surrogatepass")),  # a non-mapping (or broken) top
        deep.map(lambda v: ("model: " + v).encode()),
        json_like.map(lambda v: yaml.safe_dump(v).encode()),
        *([serve_trees] if case == "serve" else []),
    )


# ---- overrides -------------------------------------------------------------------------------
ODD_OVERRIDES = ["=", "..=", ".=", "a.b=[1", "a..b=1", "=1", "===", "model=", "model.seed", "model.seed==1",
                 "model.seed=1=2", " = ", "model.seed.x=1", "schema.streams.0.name=x", "é.ü=1", "😀=😀"]


@st.composite
def overrides(draw, case: str):
    known = field_paths(CASES[case][0])
    part = st.one_of(st.sampled_from([p.split(".")[-1] for p in known]), st.text(max_size=5), st.just(""))
    key = st.one_of(st.sampled_from(known), st.lists(part, min_size=1, max_size=4).map(".".join))
    value = st.one_of(yaml_values, atoms)
    spaced = st.sampled_from(["{k}={v}", " {k} = {v} ", "{k}={v}\n"])
    one = st.one_of(st.tuples(spaced, key, value).map(lambda t: t[0].format(k=t[1], v=t[2])),
                    st.sampled_from(ODD_OVERRIDES), st.text(max_size=20))
    return draw(st.lists(one, min_size=1, max_size=3))


# ---- properties ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=120, **FUZZ)
@given(data=st.data())
def test_any_file_gives_a_config_or_a_config_error_naming_it(tmp_path, case, data):
    raw = data.draw(file_bytes(case), label="file")
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    expect_config_error_or(case, lambda: load(case, path), [str(path)])


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=120, **FUZZ)
@given(data=st.data())
def test_any_override_gives_a_config_or_a_config_error_naming_it(case, data):
    given_overrides = data.draw(overrides(case), label="overrides")
    path = CASES[case][1]
    names = [str(path), *given_overrides, *map(repr, given_overrides)]
    expect_config_error_or(case, lambda: load(case, path, given_overrides), names)


@settings(max_examples=300, **FUZZ)
@given(override=st.one_of(overrides("demo").map(lambda o: o[0]), st.text(max_size=30)),
       tree=st.dictionaries(st.text(max_size=4), json_like, max_size=3))
def test_apply_override_raises_only_config_errors_naming_the_override(override, tree):
    try:
        apply_override(tree, override)
    except ConfigError as e:
        assert override in str(e) or repr(override) in str(e), str(e)


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=75, **FUZZ)
@given(data=st.data())
def test_known_int_fields_round_trip(case, data):
    dotted, valid, _ = data.draw(st.sampled_from(INT_FIELDS[case]), label="field")
    value = data.draw(valid, label="value")
    spelling = data.draw(st.sampled_from(["{k}={v}", "{k}= {v}", " {k} ={v}\n", "{k}={v} # a comment"]))
    cfg = load(case, CASES[case][1], [spelling.format(k=dotted, v=value)])
    assert value_of(cfg, dotted) == value and type(value_of(cfg, dotted)) is int


@pytest.mark.parametrize("case", sorted(CASES))
@settings(max_examples=30, **FUZZ)
@given(data=st.data())
def test_out_of_range_ints_are_refused_naming_the_field(case, data):
    bounded = [(f, lo, hi) for f, _, (lo, hi) in INT_FIELDS[case] if lo is not None or hi is not None]
    dotted, lo, hi = data.draw(st.sampled_from(bounded), label="field")
    below = st.integers(-HUGE, lo - 1) if lo is not None else st.nothing()
    above = st.integers(hi + 1, HUGE) if hi is not None else st.nothing()
    value = data.draw(st.one_of(below, above), label="value")
    path = CASES[case][1]
    with pytest.raises(ConfigError) as e:
        load(case, path, [f"{dotted}={value}"])
    assert str(path) in str(e.value)
    assert dotted in str(e.value)


# path fields that are checked on disk (check_paths=True): case -> override templates
PATH_FIELDS = {
    "prepare": ["tokenizer={p}", "sources=[{{kind: jsonl, path: {p}}}]"],
    "train": ["data.prepare={p}", "data.path={p}\ndata.prepare=null", "model.pretrained={p}"],
    "serve": ["checkpoint={p}"],
}
paths = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", ".", "..", "/", "//", "~", "jobs", "jobs/demo.yaml", "runs", "/dev/null", "/proc/self/mem", "a\x00b",
     "a" * 255, "a" * 256, "é" * 128, "a/" * 2100, "😀" * 70]))


@pytest.mark.parametrize("case", sorted(PATH_FIELDS))
@settings(max_examples=40, **FUZZ)
@given(data=st.data())
def test_odd_paths_checked_on_disk_give_config_errors(case, data):
    template = data.draw(st.sampled_from(PATH_FIELDS[case]), label="field")
    value = json.dumps(data.draw(paths, label="path"))  # JSON strings are YAML strings
    given_overrides = template.format(p=value).split("\n")
    cls, path, _ = CASES[case]

    def load_checked():
        if case == "serve":
            return load_serve_file(path, given_overrides, check_paths=True)[0]
        return load_config(cls, path, given_overrides, check_paths=True)

    expect_config_error_or(case, load_checked, [str(path), *given_overrides, *map(repr, given_overrides)])

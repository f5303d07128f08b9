"""Fuzzing the config loader (issue 7): random YAML files (real keys with wrong types and
values, random keys, nesting, non-mapping top levels, broken YAML, non-UTF-8 bytes, tags) and
random ``--set`` overrides never give a traceback: a valid config, or one ``DwlabError`` line
naming the file or the override; through ``dwlab train``: exit code 2 and one line on stderr.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dwlab.cli import app
from dwlab.config import Config, dump_yaml, flatten, load_config, validate
from dwlab.errors import DwlabError

LEAF_KEYS = sorted(flatten(Config()))  # "train.epochs", "assigner.dw.beta", ...
SECTION_KEYS = sorted({k.rsplit(".", i)[0] for k in LEAF_KEYS for i in (1, 2) if k.count(".") >= i})
FRAGMENTS = [  # YAML that PyYAML's safe loader refuses in different ways
    "!!int x", "!!float 1.2.3", "!!bool maybe", "!!timestamp soon", "!!binary ~~", "!!set [1]",
    '!!python/object/apply:os.system ["true"]', "!!python/name:os.system", "&a [*a]", "*undefined",
    "<<: 3", "? [a]\n: 1", "[", "{a: ", "'unterminated", "\t- x", "%YAML 9.9\n---", "\x00", "\ufeff", "---\n---",
    "a: b: c", "- a\nb: c", "@", "`", "!!omap [1]", "[" * 60, "{" * 60, ".nan", "-.inf", "0x1F", "1e999",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**20), 10**20), st.floats(allow_nan=True), st.text(max_size=8),
    st.sampled_from(["resnet18", "dw", "fcos", "cuda", "official", "soft", "", "null", "1e-3"]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
keys = st.one_of(st.sampled_from(LEAF_KEYS), st.sampled_from(SECTION_KEYS), st.text(max_size=10))


def nest(pairs: list[tuple[str, object]]) -> dict:
    """``[("train.epochs", 3)]`` -> ``{"train": {"epochs": 3}}``; a later pair wins."""
    raw: dict = {}
    for key, value in pairs:
        *parents, last = key.split(".")
        node = raw
        for part in parents:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[last] = value
    return raw


mappings = st.lists(st.tuples(keys, values), max_size=5).map(nest)
texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=3).map("\n".join),
    st.text(alphabet=st.sampled_from(list(":-[]{}!&*#'\"%@`|>?,\n\t ab01.")), max_size=30),
    st.tuples(mappings, st.sampled_from(FRAGMENTS)).map(lambda t: yaml.safe_dump(t[0]) + t[1]),
)
files = st.one_of(
    mappings.map(yaml.safe_dump),  # mostly real keys: wrong types and values, unknown keys
    values.map(yaml.safe_dump),  # any top level: scalar, list, null, mapping
    texts,  # broken or hostile YAML
    st.binary(max_size=40),  # not text at all (usually not UTF-8)
)
override_values = st.one_of(
    scalars.map(lambda v: yaml.safe_dump(v).removesuffix("\n...\n").strip()),
    st.sampled_from(FRAGMENTS),
    st.text(max_size=10),
)
overrides = st.lists(
    st.one_of(
        st.tuples(keys, override_values).map(lambda kv: f"{kv[0]}={kv[1]}"),
        st.text(max_size=12),  # usually no '=': not an override
    ),
    max_size=3,
)


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", errors="surrogatepass")
    return path


FUZZ = settings(
    max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@FUZZ
@given(content=files, sets=overrides)
def test_fuzzed_config_loads_or_is_one_line_naming_the_file_or_override(content, sets, tmp_path):
    path = write(tmp_path / "fuzz.yaml", content)
    try:
        cfg = load_config(str(path), sets)
    except DwlabError as err:
        message = str(err)
        assert message and "\n" not in message, message
        assert message.startswith((f"{path}:", "override '")), message
    else:  # valid: the resolved config (what a run writes to config.yaml) reads back the same
        assert dump_yaml(validate(yaml.safe_load(dump_yaml(cfg)), "again")) == dump_yaml(cfg)


@settings(FUZZ, max_examples=40)
@given(content=files, sets=overrides)
def test_fuzzed_config_through_the_cli_exits_2_with_one_line(content, sets, tmp_path):
    """``dwlab train`` itself; the last override is always invalid (``train.epochs=0``), so that
    nothing is ever trained, whatever the random part."""
    path = write(tmp_path / "fuzz.yaml", content)
    args = ["train", str(path), "--out", str(tmp_path / "run")]
    for item in [*sets, "train.epochs=0"]:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exception, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"train: {epochs: 2}\nname: caf\xe9\n", "not valid YAML (not UTF-8 text"),
        ("train:\n  epochs: !!int two\n", "not valid YAML (bad value (ValueError: invalid literal"),
        ("train: !!timestamp soon\n", "not valid YAML (bad value (AttributeError"),
        ("name: a\x00b\n", "not valid YAML (unacceptable character #x0000"),
        ("[" * 5000, "not valid YAML (bad value (RecursionError"),
        ("- train\n- model\n", "expected a mapping of config sections, got list"),
        ("train:\n  epochs: [1, 2]\n", "train.epochs: Input should be a valid integer (got [1, 2])"),
        ("train: 3\n", "train: Input should be a valid dictionary"),
    ],
)
def test_hostile_config_files_through_the_cli(content, expected, tmp_path):
    path = write(tmp_path / "c.yaml", content)
    result = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, (result.exception, result.output)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(f"error: {path}: {expected}"), result.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.epochs=!!int x", "train.epochs: Input should be a valid integer, unable to parse string"),
        ("train.lr=[", "train.lr: Input should be a valid number"),
        ("model=3", "model: Input should be a valid dictionary"),
        ("train.epochs.x=1", "override 'train.epochs.x': 'epochs' is a value, not a section"),
    ],
)
def test_bad_set_through_the_cli(override, expected, tmp_path):
    path = write(tmp_path / "c.yaml", "name: ok\n")
    result = CliRunner().invoke(app, ["train", str(path), "--set", override, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, (result.exception, result.output)
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert expected in result.stderr, result.stderr

"""The package's shape, read from its source: no private name crosses a module boundary, no
function outgrows a screen, and every MLflow tag name comes from ``dwlab.store``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import dwlab
from dwlab.store import Tag

PACKAGE = Path(dwlab.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60


def test_no_private_name_is_imported_from_another_module():
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dwlab"):
                found += [f"{path.relative_to(PACKAGE)}: {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]  # fmt: skip
    assert not found, found


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_mlflow_tag_names_are_spelt_only_in_the_store_module():
    """A tag written as a string literal elsewhere could drift from the one the report reads."""
    names = {v for k, v in vars(Tag).items() if k.isupper()}
    assert len(names) == len([k for k in vars(Tag) if k.isupper()])  # no two constants share a name
    literal = re.compile(r"""["'](?:tags\.)?(dwlab\.[a-z_]+|mlflow\.parentRunId)["']""")
    found = []
    for path in SOURCES:
        if path.name == "store.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for name in literal.findall(line):
                if name in names or name.startswith("dwlab.") and "import" not in line:
                    found.append(f"{path.relative_to(PACKAGE)}:{number}: {name}")
    assert not found, found

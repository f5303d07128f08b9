"""dwlab bundle, the parts that run offline and in seconds: which distributions travel, the
stripping rules (on a fake tree, and against what dwlab's commands import), the symbol strip,
the archive, the manifest rows, pip's failure line, bad options. The end-to-end check (download,
a fresh Python 3.12 with PyPI's torch, a sweep and a report from the unpacked bundle) is manual:
README.md, "Run on an offline GPU host"."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

from dwlab.bundle import (
    STRIP, Target, checkout, distributions, files, pack, pins, pip_failure, strip, strip_symbols,
)  # fmt: skip
from dwlab.cli import app
from dwlab.errors import DwlabError


def test_torch_stays_with_the_host_and_everything_else_travels_at_this_environments_versions():
    pinned = pins(checkout(), Target("3.12"))
    for host in ("torch", "torchvision", "numpy", "pillow", "sympy", "jinja2"):
        assert host not in pinned, host
    for name in ("pydantic", "pycocotools", "ray", "mlflow-skinny", "sqlalchemy", "alembic",
                 "pandas", "matplotlib", "typer", "rich", "pyyaml", "jsonschema"):  # fmt: skip
        assert name in pinned, name
    assert "scipy" not in pinned  # the report's Kendall tau is dwlab's own (dwlab.report.kendall)
    assert "typing-extensions" in pinned  # pydantic needs a newer one than an old torch brings
    assert "pyarrow" in pinned and "tensorboardx" in pinned  # ray[tune]: ray.tune will not import without pyarrow
    assert "mlflow" not in pinned and "flask" not in pinned and "gunicorn" not in pinned  # no tracking server
    assert all(pinned[name] == metadata.version(name) for name in pinned)


def test_what_the_host_has_is_left_out_with_what_it_requires():
    full = pins(checkout(), Target("3.12"))
    lean = pins(checkout(), Target("3.12"), host_has=("pandas", "matplotlib"))
    assert set(full) - set(lean) >= {"pandas", "matplotlib", "python-dateutil", "kiwisolver", "fonttools"}
    assert {"ray", "mlflow-skinny", "sqlalchemy", "pydantic", "pycocotools", "typer"} <= set(lean)
    with pytest.raises(DwlabError, match="--host-has no-such-dist: not installed here"):
        pins(checkout(), Target("3.12"), host_has=("no-such-dist",))


def test_requirement_markers_are_read_for_the_hosts_python_not_this_one():
    old = Requirement('tomli; python_version < "3.12"').marker
    assert not old.evaluate(Target("3.12").markers()) and old.evaluate(Target("3.11").markers())
    assert not Requirement('pywin32; sys_platform == "win32"').marker.evaluate(Target("3.12").markers())


def touch(path: Path, size: int = 10) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)


def test_strip_removes_its_paths_and_keeps_the_rest(tmp_path):
    gone = ["ray/jars/ray_dist.jar", "ray/rllib/algorithms/ppo.py", "ray/serve/api.py", "ray/llm/__init__.py",
            "ray/dashboard/client/build/index.html", "pyarrow/libarrow_flight.so.2500",
            "pyarrow/_flight.cpython-312-x86_64-linux-gnu.so", "pyarrow/_flight.pyx", "pyarrow/include/arrow/api.h",
            "pyarrow/lib.pxd", "pyarrow/tests/test_fs.py", "fontTools/ttLib/ttFont.py", "fontTools/misc/bezierTools.c",
            "databricks/sdk/core.py", "pandas/tests/frame/t.py", "matplotlib/tests/test_axes.py",
            "mpl_toolkits/mplot3d/tests/t.py", "bin/ray"]  # fmt: skip
    kept = ["ray/tune/__init__.py", "ray/dashboard/modules/job/job_head.py", "ray/data/__init__.py",
            "pyarrow/libarrow.so.2500", "pyarrow/lib.cpython-312-x86_64-linux-gnu.so", "pyarrow/fs.py",
            "fontTools/agl.py", "fontTools/misc/textTools.py", "databricks/__init__.py", "pandas/core/frame.py",
            "matplotlib/testing/__init__.py", "mlflow/assistant/skills/tests/x.md"]  # fmt: skip
    for i, name in enumerate(gone + kept):
        touch(tmp_path / name, size=100 + i)
    removed = strip(tmp_path)
    assert not [name for name in gone if (tmp_path / name).exists()]
    assert all((tmp_path / name).is_file() for name in kept)
    assert removed["ray/jars"] == 100 and removed["bin"] == 100 + len(gone) - 1
    assert removed["pyarrow/_flight*"] == 106 + 107 and removed["fontTools/**/*.c"] == 112
    assert sum(removed.values()) == sum(100 + i for i in range(len(gone)))


IMPORTS = """
import io, json, sys
import dwlab.cli, dwlab.runner, dwlab.report.build, dwlab.sweep.tune_run, dwlab.sweep.trainable, dwlab.sweep.searchers
import mlflow, optuna, pyarrow.fs, ray.train.torch, ray.tune
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
from matplotlib.figure import Figure
from dwlab.report.kendall import kendall_tau
kendall_tau([1, 2, 3, 4], [1, 3, 2, 4])
optuna.samplers.TPESampler(seed=0)
pyarrow.fs.LocalFileSystem().get_file_info("/")
fig = Figure()
fig.add_subplot().set_ylabel(r"$P_{neg}$(IoU)")  # mathtext, as dwlab plot's figures
fig.savefig(io.BytesIO(), format="png")
modules = {m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)}
with open("/proc/self/maps") as f:  # shared libraries: extensions and what they load (NEEDED, dlopen)
    mapped = {line.split(maxsplit=5)[5].strip() for line in f if line.count(" ") >= 5 and "/" in line}
print(json.dumps(sorted(modules | mapped)))
"""


def test_nothing_stripped_is_imported_by_dwlabs_commands():
    """The driver's imports of train, sweep (Ray Tune, Ray Train, pyarrow's file system, Optuna's
    TPE, MLflow's sqlite store), report (pandas, dwlab's Kendall tau) and plot (a PNG with
    mathtext), read in a fresh process: the modules' files and every shared library mapped."""
    out = subprocess.run([sys.executable, "-c", IMPORTS], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(checkout())})  # fmt: skip
    imported = [Path(f) for f in json.loads(out.stdout.splitlines()[-1])]
    site = Path(sysconfig.get_paths()["purelib"])
    stripped = [path for pattern, _ in STRIP for path in site.glob(pattern)]
    assert len(imported) > 1000 and stripped  # the imports ran, the rules match this environment
    assert any(f.name.startswith("libarrow.so") for f in imported)  # the maps were read
    hits = [str(f) for f in imported for path in stripped if f.is_relative_to(path)]
    assert not hits, hits


def test_stripped_extension_still_imports_and_vendored_libraries_are_left_alone(tmp_path):
    if shutil.which("strip") is None:
        pytest.skip("no strip (binutils) on this machine")
    import yaml

    package = tmp_path / "site" / "yaml"
    shutil.copytree(Path(yaml.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    extension = next(package.glob("_yaml*.so"))
    original = extension.read_bytes()
    vendored = tmp_path / "site" / "yaml.libs" / "libyaml-copy.so"  # auditwheel's folder: patched, not stripped
    vendored.parent.mkdir()
    vendored.write_bytes(original)
    saved = strip_symbols(tmp_path / "site")
    assert saved > 0 and extension.stat().st_size == len(original) - saved
    assert vendored.read_bytes() == original
    check = "import yaml; assert yaml.__with_libyaml__; print(yaml.load('a: 1', Loader=yaml.CLoader))"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path / "site")}, check=True)  # fmt: skip
    assert out.stdout.strip() == "{'a': 1}"


def test_the_archive_unpacks_to_one_folder_with_executables_kept(tmp_path):
    folder = tmp_path / "dwlab-py312"
    touch(folder / "site" / "pkg" / "__init__.py")
    touch(folder / "site" / "ray" / "core" / "raylet", size=5000)
    (folder / "site" / "ray" / "core" / "raylet").chmod(0o755)
    pack(folder, tmp_path / "a.tar.xz")
    with tarfile.open(tmp_path / "a.tar.xz", "r:xz") as tar:
        assert {Path(m.name).parts[0] for m in tar.getmembers()} == {"dwlab-py312"}
        assert {m.uid for m in tar.getmembers()} == {0}
        tar.extractall(tmp_path / "x", filter="data")
    raylet = tmp_path / "x" / "dwlab-py312" / "site" / "ray" / "core" / "raylet"
    assert raylet.read_bytes() == b"x" * 5000 and os.access(raylet, os.X_OK)


def test_manifest_rows_name_each_wheel_with_its_sha256(tmp_path):
    wheel = tmp_path / "PyYAML-6.0.4-cp312-cp312-manylinux2014_x86_64.whl"
    wheel.write_bytes(b"not really a zip")
    rows = distributions([wheel], {"pyyaml": "6.0.4"})
    assert rows == [{"name": "pyyaml", "version": "6.0.4", "wheel": wheel.name, "bytes": 16,
                     "sha256": hashlib.sha256(b"not really a zip").hexdigest()}]  # fmt: skip
    assert files(tmp_path) == {wheel.name: {"bytes": 16, "sha256": rows[0]["sha256"]}}


def test_a_python_without_wheels_is_one_line_from_pips_own_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-index", "--find-links", str(tmp_path), "--no-deps",
         "--dest", str(tmp_path), "dwlab-no-such-distribution==1.0"], capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0
    line = pip_failure(proc.stderr + proc.stdout, Target("3.13"))
    assert line.startswith("--python 3.13: no cp313 wheel of dwlab-no-such-distribution==1.0 for manylinux")
    assert "\n" not in line


@pytest.mark.parametrize(
    "python, message",
    [("3.10", "--python 3.10: dwlab needs Python >=3.11"), ("py3", "--python 'py3': expected major.minor")],
)
def test_a_bad_python_is_one_line_and_writes_nothing(tmp_path, python, message):
    out = tmp_path / "bundle"
    res = CliRunner().invoke(app, ["bundle", "--python", python, "--out", str(out)])
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and message in lines[0], res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_occupied_out_folder_is_refused(tmp_path):
    touch(tmp_path / "bundle" / "keep.txt")
    res = CliRunner().invoke(app, ["bundle", "--python", "3.12", "--out", str(tmp_path / "bundle")])
    assert res.exit_code == 2 and "exists and is not empty" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"] and (tmp_path / "bundle" / "keep.txt").is_file()

"""An offline install of dwlab for a GPU host that has Python, torch and torchvision but no network.

``dwlab bundle --python 3.12 --out DIR`` writes, into DIR (absent until everything is written):

- ``dwlab-py312.tar.xz``: one folder ``dwlab-py312/`` with ``site/`` (dwlab itself and every
  distribution its requirements pull in beyond torch and torchvision, at the versions installed
  here, for CPython 3.12 on x86-64 Linux) and ``experiments/``. The host puts ``site/`` on its
  ``PYTHONPATH``; Ray's workers inherit it.
- ``cache/``: a preset's domain-pretrained backbone (``dwlab pretrain``'s cache file), where
  ``DWLAB_CACHE=DIR/cache`` finds it, so the host does not pretrain again.
- ``manifest.json`` (every distribution's version and wheel sha256, the sizes, what was stripped)
  and ``SHA256SUMS`` (``sha256sum -c SHA256SUMS`` on the host).

Which distributions travel is read from this environment's metadata: the requirements of
``pyproject.toml`` with their extras (``ray[tune,train]``: ray.tune will not import without
pandas and pyarrow), mlflow replaced by its tracking client (``mlflow-skinny``) plus the sqlite
store's SQLAlchemy and alembic, each distribution's own requirements followed with markers
evaluated for the host, and torch, torchvision and what they require left to the host. Every wheel is installed in one ``pip --target`` call: a second call replaces the
``opentelemetry/`` namespace folder that several distributions share, and mlflow stops importing.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename

from dwlab.errors import DwlabError

HOST = ("torch", "torchvision")  # the host's, with everything they require
SUBSTITUTES = {"mlflow": ("mlflow-skinny", "sqlalchemy", "alembic")}  # the client and its sqlite store, no server
ALWAYS = ("typing-extensions",)  # pydantic needs >= 4.16, newer than older torch installs bring
GLIBC = (2, 28)  # torch >= 2.6's own wheels need it, so every host that runs them has it
ARCH = "x86_64"
STRIP = (  # (glob under site/, why it can go): nothing that a dwlab command loads (tests/test_bundle.py)
    ("ray/jars", "Ray's Java workers"),
    ("ray/rllib", "Ray libraries dwlab never imports"),
    ("ray/serve", "Ray libraries dwlab never imports"),
    ("ray/llm", "Ray libraries dwlab never imports"),
    ("ray/dashboard/client/build", "the dashboard's web pages: dwlab starts Ray without its dashboard"),
    ("pyarrow/libarrow_flight.so*", "Arrow Flight RPC: only pyarrow.flight loads it, not pyarrow.lib or pyarrow.fs"),
    ("pyarrow/_flight*", "Arrow Flight RPC: only pyarrow.flight loads it, not pyarrow.lib or pyarrow.fs"),
    ("pyarrow/flight.py", "Arrow Flight RPC: only pyarrow.flight loads it, not pyarrow.lib or pyarrow.fs"),
    *((f"pyarrow/{path}", "C++ and Cython sources, for building against Arrow")
      for path in ("include", "src", "includes", "*.pyx", "*.pxd", "*.pxi")),
    ("pyarrow/tests", "test suites"),
    *((f"fontTools/{sub}", ("matplotlib's PDF/PS font subsetting: dwlab writes PNG; matplotlib.dviread "
                             "imports only fontTools.agl and fontTools.misc"))
      for sub in ("cffLib", "colorLib", "config", "cu2qu", "designspaceLib", "diff", "encodings", "feaLib", "merge",
                  "mtiLib", "otlLib", "pens", "qu2cu", "subset", "svgLib", "t1Lib", "ttLib", "ttx.py", "ufoLib",
                  "unicodedata", "varLib", "voltLib")),
    ("fontTools/**/*.c", "C sources of fontTools' compiled modules"),
    ("databricks/sdk", ("the Databricks workspace client, for databricks:// stores only (databricks/__init__.py "
                        "stays: mlflow asks find_spec('databricks.agents'), which needs the parent package)")),
    ("pandas/tests", "test suites"),
    ("matplotlib/tests", "test suites"),
    ("mpl_toolkits/*/tests", "test suites"),
    ("bin", "console scripts, whose first line names this machine's Python"),
)  # fmt: skip
SYMBOLS = "ELF symbol tables and debug sections (strip --strip-unneeded), outside auditwheel's *.libs"
#: x86 branch conversion before LZMA2: the archive is mostly x86-64 machine code
XZ_FILTERS = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


@dataclass(frozen=True)
class Target:
    """The host's CPython, ``major.minor``: ``"3.12"``."""

    python: str

    @property
    def tag(self) -> str:  # "cp312"
        return "cp" + self.python.replace(".", "")

    @property
    def name(self) -> str:  # "dwlab-py312", the archive's folder
        return "dwlab-py" + self.python.replace(".", "")

    def pip_args(self) -> list[str]:
        """pip's options that select wheels for this Python on manylinux x86-64 up to ``GLIBC``."""
        platforms = [f"manylinux_{GLIBC[0]}_{minor}_{ARCH}" for minor in range(GLIBC[1], 4, -1)]
        platforms += [f"manylinux2014_{ARCH}", f"manylinux2010_{ARCH}", f"manylinux1_{ARCH}"]
        args = ["--only-binary=:all:", "--python-version", self.python, "--implementation", "cp", "--abi", self.tag]
        return args + [arg for p in platforms for arg in ("--platform", p)]

    def markers(self) -> dict[str, str]:
        """The environment that requirement markers are evaluated in on the host."""
        env = default_environment()
        env.update(python_version=self.python, python_full_version=self.python + ".0", implementation_name="cpython",
                   platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
                   os_name="posix", platform_machine=ARCH, extra="")  # fmt: skip
        return env


def parse_target(python: str, root: Path) -> Target:
    """``--python`` checked against its form and ``pyproject.toml``'s ``requires-python``."""
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise DwlabError(f"--python {python!r}: expected major.minor, e.g. 3.12")
    requires = SpecifierSet(project(root).get("requires-python", ""))
    if not requires.contains(python + ".0"):
        raise DwlabError(f"--python {python}: dwlab needs Python {requires} (requires-python in {root / 'pyproject.toml'})")
    return Target(python)


def checkout() -> Path:
    """The checkout dwlab is imported from: the bundle takes its ``experiments/`` and ``pyproject.toml``."""
    root = Path(__file__).resolve().parents[1]
    missing = [name for name in ("pyproject.toml", "experiments") if not (root / name).exists()]
    if missing:
        raise DwlabError(f"{root}: no {' or '.join(missing)}; run dwlab bundle from a dwlab checkout")
    return root


def project(root: Path) -> dict:
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]


def closure(roots: list[Requirement], env: dict[str, str], stop: frozenset[str] = frozenset()) -> dict[str, str]:
    """``{name: version installed here}`` for ``roots`` (with their extras) and everything they
    require under the markers ``env``, not entering the names in ``stop``."""
    found: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [(canonicalize_name(r.name), extra) for r in roots for extra in ("", *r.extras)]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in done or name in stop:
            continue
        done.add((name, extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise DwlabError(f"{name} is not installed here: the bundle pins this environment's versions "
                             "(pip install -e . first)") from None  # fmt: skip
        found[name] = dist.version
        for line in dist.requires or ():
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({**env, "extra": extra}):
                todo += [(canonicalize_name(req.name), e) for e in ("", *req.extras)]
    return found


def pins(root: Path, target: Target, host_has: tuple[str, ...] = ()) -> dict[str, str]:
    """``{distribution: version}`` that the bundle carries (see the module docstring); the
    distributions in ``host_has`` are the host's too, with what they require."""
    env = target.markers()
    for name in host_has:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise DwlabError(f"--host-has {name}: not installed here, so what it requires is unknown") from None
    host = closure([Requirement(n) for n in (*HOST, *host_has)], env)
    roots = [Requirement(n) for n in ALWAYS]
    for line in project(root)["dependencies"]:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name not in HOST:
            roots += [Requirement(n) for n in SUBSTITUTES[name]] if name in SUBSTITUTES else [req]
    return closure(roots, env, stop=frozenset(host) - set(ALWAYS))


def pip(args: list[str], target: Target) -> None:
    """Run this Python's pip; a failure is one line naming what has no wheel for ``target``."""
    proc = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if proc.returncode:
        raise DwlabError(pip_failure(proc.stderr + proc.stdout, target))


def pip_failure(output: str, target: Target) -> str:
    """The one-line error for pip's ``output``."""
    missing = re.search(r"No matching distribution found for (\S+)", output)
    if missing:
        return (f"--python {target.python}: no {target.tag} wheel of {missing.group(1)} for manylinux "
                f"glibc {GLIBC[0]}.{GLIBC[1]} {ARCH} on the package index (or the index is unreachable)")  # fmt: skip
    errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
    return "pip: " + (errors[-1].removeprefix("ERROR:").strip() if errors else output.strip().splitlines()[-1])


def download(pinned: dict[str, str], target: Target, dest: Path) -> list[Path]:
    """The wheels of ``pinned`` for ``target``, one per distribution, in ``dest``."""
    pip(["download", "--no-deps", "--quiet", "--dest", str(dest), *target.pip_args(),
         *(f"{name}=={version}" for name, version in sorted(pinned.items()))], target)  # fmt: skip
    wheels = sorted(dest.glob("*.whl"))
    got = {canonicalize_name(parse_wheel_filename(w.name)[0]) for w in wheels}
    if got != set(pinned):
        raise DwlabError(f"pip download: expected wheels of {sorted(pinned)}, got {sorted(got)}")
    return wheels


def install(wheels: list[Path], target: Target, site: Path) -> None:
    """All ``wheels`` into ``site`` in ONE ``pip --target`` call (see the module docstring)."""
    pip(["install", "--no-deps", "--no-index", "--no-compile", "--quiet", "--target", str(site),
         *target.pip_args(), *map(str, wheels)], target)  # fmt: skip


def strip(site: Path) -> dict[str, int]:
    """Delete ``STRIP``'s paths under ``site``; returns the bytes each rule removed."""
    removed: dict[str, int] = {}
    for pattern, _why in STRIP:
        for path in sorted(site.glob(pattern)):
            if path.exists():
                removed[pattern] = removed.get(pattern, 0) + tree_bytes(path)
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return removed


def strip_symbols(site: Path) -> int:
    """Drop symbol tables and debug sections from the ELF files under ``site`` (Ray's binaries
    carry them, a third of their size), except auditwheel's vendored ``*.libs``; returns the
    bytes saved."""
    exe = shutil.which("strip")
    if exe is None:
        raise DwlabError("strip (GNU binutils) not found: install binutils, e.g. apt-get install binutils")
    files = [p for p in sorted(site.rglob("*")) if is_elf(p) and not p.parent.name.endswith(".libs")]
    before = sum(p.stat().st_size for p in files)
    for start in range(0, len(files), 200):
        proc = subprocess.run([exe, "--strip-unneeded", *map(str, files[start : start + 200])], capture_output=True, text=True)
        if proc.returncode:
            raise DwlabError(f"strip: {proc.stderr.strip().splitlines()[-1]}")
    return before - sum(p.stat().st_size for p in files)


def is_elf(path: Path) -> bool:
    if not path.is_file() or path.is_symlink():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def add_dwlab(root: Path, folder: Path) -> None:
    """dwlab's package into ``folder/site`` and its sweep files into ``folder/experiments``."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(root / "dwlab", folder / "site" / "dwlab", ignore=ignore)
    shutil.copytree(root / "experiments", folder / "experiments", ignore=ignore)


def pack(folder: Path, archive: Path) -> None:
    """``folder`` as ``archive`` (tar, xz with ``XZ_FILTERS``), owned by nobody in particular."""

    def anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    with lzma.open(archive, "wb", format=lzma.FORMAT_XZ, filters=XZ_FILTERS) as xz:
        with tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder, arcname=folder.name, filter=anonymous)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bring_backbone(preset: str, cache: Path, log=print) -> list[Path]:
    """``preset``'s domain-pretrained backbone (``dwlab.pretrain``, built here when not cached
    yet) and its record, copied into ``cache`` at the path they have in this machine's cache;
    returns the copies."""
    from dwlab.config import load_config
    from dwlab.data.synth import cache_root
    from dwlab.pretrain import cached_backbone

    cfg = load_config(preset, [])
    if cfg.model.pretrained != "synth":
        raise DwlabError(f"--backbone {preset}: model.pretrained is {cfg.model.pretrained!r}, not synth: "
                         "it has no domain-pretrained backbone")  # fmt: skip
    path = cached_backbone(cfg.model.backbone, cfg.model.pretrain, log=log)
    copies = []
    for source in (path, path.with_suffix(".json")):
        if source.is_file():
            copy = cache / source.relative_to(cache_root())
            copy.parent.mkdir(parents=True, exist_ok=True)
            copies.append(Path(shutil.copy2(source, copy)))
    return copies


def distributions(wheels: list[Path], pinned: dict[str, str]) -> list[dict]:
    """Per wheel: the distribution's name and version, the wheel's file name, bytes and sha256."""
    rows = []
    for wheel in wheels:
        name = canonicalize_name(parse_wheel_filename(wheel.name)[0])
        rows.append({"name": name, "version": pinned[name], "wheel": wheel.name,
                     "bytes": wheel.stat().st_size, "sha256": sha256(wheel)})  # fmt: skip
    return rows


def files(folder: Path) -> dict[str, dict]:
    """``{path relative to folder: {"bytes", "sha256"}}`` for every file under ``folder``."""
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in paths}


def build_bundle(python: str, out: Path, backbone: str = "mini", host_has: tuple[str, ...] = (), log=print) -> dict:
    """Write the bundle for CPython ``python`` into ``out`` (see the module docstring), leaving
    out ``host_has`` and what they require; returns the manifest. Everything is written into a
    temp sibling that is renamed to ``out`` at the end."""
    root = checkout()
    target = parse_target(python, root)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DwlabError(f"--out {out}: exists and is not empty; remove it or choose another folder")
    pinned = pins(root, target, host_has)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        record = assemble(root, target, pinned, stage, backbone, [*HOST, *host_has], log)
        stage.chmod(0o755)  # mkdtemp's folder is the owner's only
        if out.exists():
            out.rmdir()
        stage.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return record


def assemble(root: Path, target: Target, pinned: dict[str, str], stage: Path, backbone: str, host: list[str], log) -> dict:
    """The bundle's files in ``stage``: download, backbone, install, strip, pack, manifest
    (``host``: the distributions left to the host with what they require)."""
    from dwlab.sweep.tracking import git_commit

    work = stage / "build"
    folder = work / target.name
    log(f"bundle: {len(pinned)} distributions for CPython {target.python}: downloading their wheels")
    wheels = download(pinned, target, work / "wheels")
    bring_backbone(backbone, stage / "cache", log=log)
    log("bundle: installing the wheels (one pip --target call) and stripping them")
    install(wheels, target, folder / "site")
    stripped = strip(folder / "site")
    stripped[SYMBOLS] = strip_symbols(folder / "site")
    add_dwlab(root, folder)
    commit = git_commit()
    (folder / "site" / "dwlab" / "COMMIT").write_text(commit + "\n")  # the host has no .git
    installed = tree_bytes(folder)
    log(f"bundle: packing {installed / 2**20:.0f} MiB into {target.name}.tar.xz (xz -9e: minutes)")
    pack(folder, stage / f"{target.name}.tar.xz")
    record = {
        "dwlab": {"version": project(root)["version"], "commit": commit},
        "host": {"python": target.python, "platform": f"manylinux glibc >= {GLIBC[0]}.{GLIBC[1]} {ARCH}",
                 "has": host + ["what they require"]},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "installed_bytes": installed,
        "stripped_bytes": stripped,
        "distributions": distributions(wheels, pinned),
    }  # fmt: skip
    shutil.rmtree(work)
    record["files"] = files(stage)
    (stage / "SHA256SUMS").write_text("".join(f"{v['sha256']}  {k}\n" for k, v in record["files"].items()))
    (stage / "manifest.json").write_text(json.dumps(record, indent=2) + "\n")
    return record

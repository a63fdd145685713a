"""The codebase checks itself: ruff and mypy are clean on the configured packages, and every
third-party import of the packages and tests is a declared dependency (pyproject.toml).

ruff and mypy settings live in pyproject.toml. The checked packages are ``talora.kernels``,
``talora.adapters`` and ``talora.server``; ``benchmarks/`` is not held to them yet.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("server", "kernels", "adapters")  # the folders of the three packages
PACKAGES = ("server", "kernels", "adapters")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


def test_ruff_is_clean():
    done = _run([sys.executable, "-m", "ruff", "check", "--no-cache", *CHECKED], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean(tmp_path):
    """mypy on ``talora.server`` and ``talora.kernels`` through a ``talora/`` folder of links, so that the
    imports between the packages (mapped by package-dir in pyproject.toml) are followed and checked."""
    namespace = tmp_path / "talora"
    namespace.mkdir()
    for folder in PACKAGES:
        (namespace / folder).symlink_to(ROOT / folder, target_is_directory=True)
    done = _run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                 "--cache-dir", str(ROOT / ".mypy_cache"), "-p", "talora.server", "-p", "talora.kernels",
                 "-p", "talora.adapters"],
                cwd=tmp_path, env={"MYPYPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stdout + done.stderr


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                                 for r in extra)]
    return {_normal(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(folder: Path) -> set[str]:
    tops = set()
    for file in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    return tops


def test_every_import_is_a_declared_dependency():
    local = {p.stem for folder in ("tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")} | {"talora"}
    distributions = importlib.metadata.packages_distributions()
    declared, missing = _declared(), []
    for folder in (*PACKAGES, "tests"):
        for module in sorted(_imports(ROOT / folder) - local - set(sys.stdlib_module_names)):
            # a module of an optional extra that is not installed here (ray without [ray]) is
            # matched by its own name
            names = {_normal(d) for d in distributions.get(module, [])} or {_normal(module)}
            if not names & declared:
                missing.append(f"{folder}: {module} (distribution {sorted(names) or 'not installed'})")
    assert not missing, "imports without a declared dependency in pyproject.toml:\n" + "\n".join(missing)


def test_the_server_install_leaves_plotting_out():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_normal(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in project["dependencies"]}
    assert "matplotlib" not in core and "pyyaml" in core
    assert "matplotlib" in {_normal(r.split(">")[0]) for r in project["optional-dependencies"]["train"]}

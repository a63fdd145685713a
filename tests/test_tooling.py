"""The codebase checks itself: ruff and mypy are clean on all of it, and every third-party import
of the packages, tests and benchmarks is a declared dependency (pyproject.toml).

ruff and mypy settings live in pyproject.toml. The checked code is the three packages
(``talora.kernels``, ``talora.adapters``, ``talora.server``), ``tests`` and ``benchmarks``; mypy
checks the last two in a lighter mode (pyproject.toml says which).
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import tomllib

from tests.helpers import ROOT

PACKAGES = ("server", "kernels", "adapters")  # the folders of the three talora packages
CHECKED = (*PACKAGES, "tests", "benchmarks")  # everything ruff and mypy check
RUNS_ELSEWHERE = {"vllm_worker.py"}  # benchmarks/serving/vllm_worker.py runs in the vLLM venv, not this install


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=600, **kwargs)


def test_ruff_is_clean():
    done = _run([sys.executable, "-m", "ruff", "check", "--no-cache", *CHECKED], cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean():
    """mypy on the three packages through a ``talora/`` folder of links, so that the imports between
    them (mapped by package-dir in pyproject.toml) are followed and checked, and on ``tests`` and
    ``benchmarks`` beside it. The links live at one fixed place inside mypy's cache folder (git
    ignores it): the cache records every module's path, so a rerun finds its modules where the last
    run left them and rechecks only what changed; a clean clone has no cache and checks everything."""
    cache = ROOT / ".mypy_cache"
    tree = cache / "tree"
    (tree / "talora").mkdir(parents=True, exist_ok=True)
    links = {f"talora/{p}": p for p in PACKAGES} | {"tests": "tests", "benchmarks": "benchmarks"}
    for link, folder in links.items():
        if not (tree / link).is_symlink() or (tree / link).readlink() != ROOT / folder:  # new, or a moved clone
            fresh = tree / f"{link}.{os.getpid()}"  # made aside and renamed: a concurrent run sees one or the other
            fresh.symlink_to(ROOT / folder, target_is_directory=True)
            os.replace(fresh, tree / link)
    packages = [arg for name in (*(f"talora.{p}" for p in PACKAGES), "tests", "benchmarks") for arg in ("-p", name)]
    done = _run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                 "--cache-dir", str(cache), *packages],
                cwd=tree, env={"MYPYPATH": str(tree), "PATH": "/usr/bin:/bin"})
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
        hidden = any(part.startswith(".") for part in file.relative_to(folder).parts)  # benchmarks/.venv-vllm
        if hidden or file.name in RUNS_ELSEWHERE:
            continue
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                tops |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                tops.add(node.module.split(".")[0])
    return tops


def test_every_import_is_a_declared_dependency():
    local = {"talora", "tests", "benchmarks"}
    distributions = importlib.metadata.packages_distributions()
    declared, missing = _declared(), []
    for folder in CHECKED:
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


# who may import whom, by folder: a file under the key imports no module under the values
FORBIDDEN = {
    "kernels": ("talora.adapters", "talora.server"),
    "adapters": ("talora.server",),
    # the parts every engine shares (facade, jobs, errors, adapter registry, settings, metrics)
    **{f"server/{name}.py": ("talora.server.engine", "talora.server.http", "talora.server.backends")
       for name in ("facade", "jobs", "errors", "adapter_registry", "settings", "metrics")},
    "server/engine": ("talora.server.http", "talora.server.backends"),
    "server/http": ("talora.server.engine", "talora.server.backends"),  # an engine only through the facade
    "server/backends/vllm": ("talora.server.engine", "talora.server.http", "talora.server.backends.ray"),
    "server/backends/ray": ("talora.server.engine", "talora.server.http", "talora.server.backends.vllm"),
}
# Ray replicas run the in-process engine (its class only); the HTTP app is the ingress's and each replica's,
# the ingress reads bodies within the app's limits, and the proxy middleware reads headers as the app does
ALLOWED = {"server/backends/ray": {"talora.server.engine", "talora.server.engine.Engine",
                                   "talora.server.http.app", "talora.server.http.app.create_app",
                                   "talora.server.http.limits", "talora.server.http.limits.read_bounded_body",
                                   "talora.server.http.headers", "talora.server.http.headers.content_length"}}


def _talora_imports(file: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {m for m in modules if m.startswith("talora.")}


def test_imports_flow_one_way():
    """kernels <- adapters <- server; in server, HTTP and backends reach an engine only through the facade,
    and no route module imports another."""
    wrong = []
    for where, banned in FORBIDDEN.items():
        files = [ROOT / where] if where.endswith(".py") else sorted((ROOT / where).rglob("*.py"))
        for file in files:
            wrong += [f"{file.relative_to(ROOT)} imports {m}" for m in sorted(_talora_imports(file))
                      if m not in ALLOWED.get(where, set()) and any(m == b or m.startswith(b + ".")
                                                                    for b in banned)]
    for file in sorted((ROOT / "server" / "http").glob("routes_*.py")):
        wrong += [f"{file.relative_to(ROOT)} imports {m}" for m in sorted(_talora_imports(file))
                  if m.startswith("talora.server.http.routes_")]
    assert not wrong, "\n".join(wrong)

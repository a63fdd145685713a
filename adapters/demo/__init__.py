"""The committed demo bundle: SmolLM2-135M-Instruct adapters for six registry tasks.

``demo_bundle_dir()`` returns this folder (``talora.json``, ``shared.safetensors`` and one
``<task>.json`` + ``<task>.safetensors`` per task). ``README.md`` here gives the command that
reproduces it (``talora-train demo --install``), the steps and the dev scores.
"""

from __future__ import annotations

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent


def demo_bundle_dir() -> Path:
    """This folder; ``talora.json`` in it says whether the bundle is built (``talora-train demo --install``)."""
    return _FOLDER

"""The committed demo bundle: SmolLM2-135M-Instruct adapters for six registry tasks.

``demo_bundle_dir()`` returns this folder (``talora.json``, ``shared.safetensors`` and one
``<task>.json`` + ``<task>.safetensors`` per task). ``README.md`` here gives the command that
reproduces it (``talora-train demo --install``), the steps and the dev scores.
"""

from __future__ import annotations

from pathlib import Path

_FOLDER = Path(__file__).resolve().parent


class DemoBundleMissing(FileNotFoundError):
    """The demo bundle's files are not in the package (not built or not installed)."""


def demo_bundle_dir(required: bool = True) -> Path | None:
    """The demo bundle folder; when its ``talora.json`` is absent, raise (or return None)."""
    if (_FOLDER / "talora.json").is_file() and (_FOLDER / "shared.safetensors").is_file():
        return _FOLDER
    if not required:
        return None
    raise DemoBundleMissing(f"{_FOLDER} holds no demo bundle; build it with `talora-train demo --install`")

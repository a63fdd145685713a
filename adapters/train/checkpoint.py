"""Resumable training checkpoints: trained tensors, optimiser, sampler RNG of every rank, step.

Checkpoints are internal training state (``<run>/checkpoints/step-000050.pt``), written with
``torch.save`` and read with ``weights_only=True`` (tensors and plain containers only). The
adapter files a run delivers are written separately in the safetensors format. The newest two
checkpoints are kept; a checkpoint is written to a temporary name and renamed, so a crash never
leaves a half-written file that ``--resume`` would pick.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")
KEEP = 2


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors of a ``TaloraModel`` (everything but the frozen LM)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("lm.")}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, sampler_states: list[dict], config: dict) -> Path:
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "model": trained_state(model), "optimizer": optimizer.state_dict(),
             "samplers": sampler_states, "torch_rng": torch.get_rng_state(), "config": config}
    path = folder / f"step-{step:06d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink()
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def restore(state: dict, model, optimizer) -> None:
    """Load the trained tensors and the optimiser state of a checkpoint into place."""
    missing = set(trained_state(model)) - set(state["model"])
    if missing:
        raise ValueError(f"resume: the checkpoint lacks {sorted(missing)[0]} (was it written by another run?)")
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])

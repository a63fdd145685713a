"""Move a ``TaloraModel`` to and from the adapter file format of ``talora.adapters.formats.io``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from talora.adapters.formats.io import (
    BundleMeta,
    TaskMeta,
    list_task_names,
    load_bundle,
    load_task,
    save_bundle,
    save_task,
)
from talora.adapters.model.config import TaloraConfig
from talora.adapters.model.frozen_lm import CausalLM
from talora.adapters.model.talora_model import TaloraModel


def export_bundle(model: TaloraModel, folder: Path, base_model: str, base_fingerprint: str,
                  training: dict[str, Any] | None = None) -> BundleMeta:
    """Write the shared part of ``model`` as a bundle; returns its metadata (with fingerprint)."""
    meta = BundleMeta(base_model=base_model, base_fingerprint=base_fingerprint,
                      model_config=model.lm.config.to_dict(), talora=model.cfg.model_dump(),
                      training=training or {})
    return save_bundle(folder, meta, model.prompt, model.basis)


def export_task(model: TaloraModel, task: str, folder: Path, bundle: BundleMeta, **task_fields) -> TaskMeta:
    """Write task ``task`` of ``model`` next to its bundle."""
    adapter = model.adapter(task)
    meta = TaskMeta(task=task, bundle_fingerprint=bundle.fingerprint, **task_fields)
    return save_task(folder, meta, adapter.fast, adapter.gate, adapter.basis)


def model_from_bundle(lm: CausalLM, folder: Path, base_fingerprint: str | None,
                      tasks: list[str] | None = None, param_dtype: torch.dtype | None = None,
                      ) -> tuple[TaloraModel, BundleMeta, dict[str, TaskMeta]]:
    """Build a ``TaloraModel`` on ``lm`` from a bundle folder and (some of) its task adapters;
    ``param_dtype`` as in ``TaloraModel`` (training keeps float32 adapters on a bfloat16 LM)."""
    meta, shared = load_bundle(folder, base_fingerprint)
    if meta.arch != lm.config:
        raise ValueError("model_config: the bundle's architecture does not match the loaded model")
    model = TaloraModel(lm, TaloraConfig(**meta.talora), param_dtype)
    with torch.no_grad():
        model.prompt.copy_(shared["prompt"].to(model.prompt))
        model.basis.copy_(shared["basis"].to(model.basis))
    task_metas = {}
    for task in tasks if tasks is not None else list_task_names(folder):
        task_meta, tensors = load_task(folder, task, meta)
        adapter = model.add_task(task, tensors["fast"], basis=tensors.get("basis"))
        with torch.no_grad():
            adapter.gate.copy_(tensors["gate"].to(adapter.gate))
        task_metas[task] = task_meta
    return model, meta, task_metas

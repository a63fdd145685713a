"""Random TA-LoRA bundles for speed and scale benchmarks (speed does not depend on trained values).

    lm = load_model()
    folder = write_random_bundle(lm.model, lm.fingerprint, tmp / "bundle", num_tasks=64)
    talora_model, meta, _ = model_from_bundle(lm.model, folder, lm.fingerprint)
"""

from __future__ import annotations

from pathlib import Path

import torch

from talora.adapters.formats.bundle import export_bundle, export_task
from talora.adapters.model.config import TaloraConfig
from talora.adapters.model.talora_model import TaloraModel


def task_name(index: int) -> str:
    return f"bench{index:05d}"


def random_talora_model(lm, cfg: TaloraConfig, num_tasks: int, seed: int = 0) -> TaloraModel:
    """``lm`` with a random shared prompt/basis and ``num_tasks`` random tasks with non-zero gates."""
    generator = torch.Generator().manual_seed(seed)
    model = TaloraModel(lm, cfg)
    model.init_shared(generator)
    for index in range(num_tasks):
        adapter = model.add_task(task_name(index), generator=generator)
        with torch.no_grad():  # open gates, so the task keys really contribute
            gate = torch.randn(adapter.gate.shape, generator=generator) * 0.5
            adapter.gate.copy_(gate.to(adapter.gate))
    return model


TASK_FIELDS = dict(kind="classify", labels=["negative", "positive"],
                   verbalizers={"negative": " negative", "positive": " positive"}, template="Text: {text}\nSentiment:")


def write_random_bundle(lm, base_fingerprint: str, folder: Path, num_tasks: int,
                        cfg: TaloraConfig | None = None, seed: int = 0, base_model: str = "smollm2-135m-instruct",
                        alternates: int = 0) -> Path:
    """Export a random bundle with ``num_tasks`` classify tasks into ``folder``; returns ``folder``.

    ``alternates`` > 0 also writes a second, different version of the first ``alternates`` tasks
    into ``folder/alt/`` (same bundle), for hot-swap tests: ``PUT {"path": "alt/<task>"}``.
    """
    model = random_talora_model(lm, cfg or TaloraConfig(shared_prompt_len=64, task_prompt_len=16, rank=8),
                                num_tasks, seed)
    meta = export_bundle(model, folder, base_model, base_fingerprint, training={"note": "random, for benchmarks"})
    for index in range(num_tasks):
        export_task(model, task_name(index), folder, meta, **TASK_FIELDS)
    generator = torch.Generator().manual_seed(seed + 1)
    for index in range(alternates):
        model.add_task(task_name(index), generator=generator)  # replaces the fast weights
        export_task(model, task_name(index), Path(folder) / "alt", meta, **TASK_FIELDS)
    return folder

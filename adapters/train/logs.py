"""Run records: one JSON object per line in ``log.jsonl``, and PNG curves drawn from it.

Rows have ``"kind": "step"`` (loss, learning rates, gate opening, seconds per step) or
``"kind": "eval"`` (metrics per task). ``loss.png`` and ``scores.png`` are drawn at the end of a
run from the whole file, so a resumed run's curves include the steps before the restart.
matplotlib comes with the ``train`` extra; without it a run still finishes, with a warning in place
of the curves.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

LOG_FILE = "log.jsonl"
PLOT_EXTRA = "pip install 'talora[train]'"

log = logging.getLogger(__name__)


class JsonlLog:
    """Append-only JSONL log; ``truncate_after(step)`` drops rows of steps that will be redone."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in read_log(self.path) if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or None (with a warning naming the extra) when it is missing."""
    try:
        import matplotlib
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        log.warning("no loss.png or scores.png: plotting needs matplotlib, which comes with the train extra "
                    "(%s); the numbers are in %s", PLOT_EXTRA, LOG_FILE)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(log_path: Path, folder: Path) -> list[Path]:
    """Write ``loss.png`` (and ``scores.png`` when eval rows exist); returns the files written (none,
    with a warning, when matplotlib is not installed: a finished training run does not fail on its plots)."""
    plt = _pyplot()
    if plt is None:
        return []
    rows = read_log(log_path)
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    written = []
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        xs, ys = [r["step"] for r in steps], [r["loss"] for r in steps]
        ax.plot(xs, ys, alpha=0.3, label="loss")
        ax.plot(xs, _smooth(ys, max(1, len(ys) // 20)), label="moving mean")
        ax.set_xlabel("step")
        ax.set_ylabel("answer-token loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / "loss.png", dpi=100)
        plt.close(fig)
        written.append(folder / "loss.png")
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for task in sorted(evals[-1]["metrics"]):
            pts = [(r["step"], _headline(r["metrics"][task])) for r in evals if task in r["metrics"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=task)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy / F1")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(folder / "scores.png", dpi=100)
        plt.close(fig)
        written.append(folder / "scores.png")
    return written


def _headline(metrics: dict) -> float:
    return metrics["accuracy"] if "accuracy" in metrics else metrics["f1"]

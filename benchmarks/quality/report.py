"""Summarise the quality benchmark's cached runs into ``quality.json`` and a bar chart.

One row per (method, task, setting) over the seeds that finished: mean and sample standard
deviation of the test accuracy, the number of seeds, the majority-class rate of the test
subset, macro-F1, parameters per task, and wall-clock. Target rows come from target runs;
source rows (``"role": "source"``, setting ``"full"``) from the multi-task source stage.
Only runs of the current plan's configuration are summarised.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

from benchmarks.harness.report import cpu_model, pyplot
from benchmarks.quality.plan import ADDED_FIELDS, METHODS, REFERENCE, SETTINGS, TALORA_SWITCHES, PeftRecipe, Run

REQUIRED = ("method", "task", "setting", "metric", "mean", "std", "seeds", "params_per_task")


def machine() -> str:
    """CPU model, logical cores, OS and library versions, in one line."""
    import torch

    cpu = cpu_model("unknown CPU")
    try:
        import peft
        import transformers

        libs = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    except ImportError:
        libs = f"torch {torch.__version__}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {gpu}, {platform.system()} {platform.release()}; {libs}"


def _stats(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _row(method, task, setting, role, group: list[tuple[dict, dict]]) -> dict:
    accs = [m["accuracy"] for _, m in group]
    f1s = [m["macro_f1"] for _, m in group]
    mean, std = _stats(accs)
    first = group[0][0]
    return {
        "method": method, "task": task, "setting": setting, "role": role, "metric": "accuracy",
        "mean": round(mean, 4), "std": round(std, 4), "seeds": len(group),
        "seed_list": sorted(r["seed"] for r, _ in group),
        "source_seeds": sorted({r["source_seed"] for r, _ in group if r.get("source_seed") is not None}),
        "macro_f1_mean": round(statistics.fmean(f1s), 4),
        "majority_rate": round(group[0][1]["majority_rate"], 4), "test_examples": group[0][1]["examples"],
        "params_per_task": first["params_per_task"], "shared_params": first["shared_params"],
        "train_steps": _budget(first)["steps"], "batch_size": _budget(first)["batch_size"],
        "train_examples": first.get("train_examples"),
        "wall_s_mean": round(statistics.fmean(r["wall_s"] for r, _ in group), 1),
        "seconds_per_step_median": round(statistics.median(r["seconds_per_step"] for r, _ in group), 2),
    }


def _budget(result: dict) -> dict:
    return result["spec"].get("train") or result["spec"]["budget"]


def method_means(rows: list[dict]) -> list[dict]:
    """Mean target accuracy of each (method, setting) over the target tasks it has rows for."""
    out = []
    for method in METHODS:
        for setting in SETTINGS:
            mine = [r for r in rows if r["role"] == "target" and r["method"] == method and r["setting"] == setting]
            if mine:
                out.append({"method": method, "setting": setting, "tasks": len(mine),
                            "mean": round(statistics.fmean(r["mean"] for r in mine), 4),
                            "macro_f1": round(statistics.fmean(r["macro_f1_mean"] for r in mine), 4),
                            "runs": sum(r["seeds"] for r in mine), "params_per_task": mine[0]["params_per_task"]})
    return out


def source_seed_means(results: list[dict]) -> list[dict]:
    """Mean target accuracy of each multi-task (method, setting, source seed): the mean over target
    tasks of the mean over target seeds, as in ``method_means``."""
    groups: dict[tuple[str, str, int], dict[str, list[float]]] = {}
    for r in results:
        if r["stage"] == "target" and r.get("source_seed") is not None:
            key = (r["method"], r["setting"], r["source_seed"])
            groups.setdefault(key, {}).setdefault(r["task"], []).append(r["metrics"][r["task"]]["accuracy"])
    order = {m: i for i, m in enumerate(METHODS)}
    return [{"method": m, "setting": st, "source_seed": s, "tasks": len(tasks),
             "runs": sum(len(v) for v in tasks.values()),
             "mean": round(statistics.fmean(statistics.fmean(v) for v in tasks.values()), 4)}
            for (m, st, s), tasks in sorted(groups.items(), key=lambda kv: (order[kv[0][0]], kv[0][1], kv[0][2]))]


def summary_rows(plan: list[Run], results: dict[str, dict]) -> list[dict]:
    """Rows for every (method, task, setting) of ``plan`` with at least one finished run."""
    groups: dict[tuple[str, str, str, str], list[tuple[dict, dict]]] = {}
    for run in plan:
        result = results.get(run.key)
        if result is None or run.stage == "reference":
            continue
        if run.stage == "source":
            for task, metrics in sorted(result["metrics"].items()):
                groups.setdefault((run.method, task, "full", "source"), []).append((result, metrics))
        else:
            groups.setdefault((run.method, run.task, run.setting, "target"), []).append(
                (result, result["metrics"][run.task]))
    order = {m: i for i, m in enumerate(METHODS)}
    settings = {s: i for i, s in enumerate(("full", "k16", "k32"))}
    keys = sorted(groups, key=lambda k: (k[3] != "target", k[1], settings[k[2]], order[k[0]]))
    return [_row(*k, groups[k]) for k in keys]


def reference_rows(plan: list[Run], results: dict[str, dict]) -> list[dict]:
    """The frozen model's zero-shot accuracy on each task's test subset (no adapter)."""
    rows = []
    for run in plan:
        result = results.get(run.key)
        if run.stage == "reference" and result is not None:
            m = result["metrics"][run.task]
            rows.append({"method": REFERENCE, "task": run.task, "accuracy": round(m["accuracy"], 4),
                         "macro_f1": round(m["macro_f1"], 4), "majority_rate": round(m["majority_rate"], 4),
                         "test_examples": m["examples"]})
    return rows


def write_summary(path: Path, rows: list[dict], command: str, config: dict, plan_size: int, done: int,
                  zero_shot: list[dict] | None = None, comparisons: list[dict] | None = None,
                  by_source_seed: dict | None = None, frozen: dict | None = None) -> dict:
    """Write quality.json. ``command`` is the one that wrote it (``last_invocation``); "command" is
    the one that resumes and completes the whole plan, since the rows come from many sittings.
    ``comparisons``: ``stats.stage_comparisons``' pooled rows; ``by_source_seed``: ``{"means":
    source_seed_means, "comparisons": the stage-pair rows}``; ``frozen``: the recipe hashes
    (``quality.recipe_record``)."""
    doc = {"machine": machine(), "command": "python -m benchmarks.quality", "last_invocation": command,
           **(frozen or {}), "runs_finished": done, "runs_planned": plan_size,
           "config": config, "zero_shot": zero_shot or [], "means": method_means(rows),
           "comparisons": comparisons or [], "by_source_seed": by_source_seed or {"means": [], "comparisons": []},
           "rows": rows}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return doc


def plot(path: Path, rows: list[dict], zero_shot: list[dict] | None = None,
         comparisons: list[dict] | None = None, by_seed: list[dict] | None = None) -> Path | None:
    """Left: grouped bars of target accuracy (mean ± std, seed count on each bar), majority rate
    dashed, the frozen model's zero-shot accuracy dotted. Right (when there are comparisons): each
    paired difference with its 90 % interval, against 0, the goal's -0.02 margin and LoRA's -0.05;
    under each, thin and hollow, the same comparison on one source stage at a time (``by_seed``)."""
    plt = pyplot()

    target = [r for r in rows if r["role"] == "target"]
    if not target:
        return None
    groups = sorted({(r["task"], r["setting"]) for r in target}, key=lambda g: (g[0], SETTINGS.index(g[1])))
    found = [c for c in comparisons or [] if c.get("ci90")]
    widths = [max(6.0, 1.6 * len(groups) + 2)] + ([4.0] if found else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths), 4.2), width_ratios=widths, squeeze=False)
    _bars(axes[0][0], target, groups, zero_shot)
    if found:
        _forest(axes[0][1], found, [c for c in by_seed or [] if c.get("ci90")])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(ax, target: list[dict], groups: list[tuple[str, str]], zero_shot: list[dict] | None) -> None:
    methods = [m for m in METHODS if any(r["method"] == m for r in target)]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        labelled = False
        for g, (task, setting) in enumerate(groups):
            row = next((r for r in target if (r["method"], r["task"], r["setting"]) == (method, task, setting)), None)
            if row is None:
                continue
            x = g + (i - (len(methods) - 1) / 2) * width
            ax.bar(x, row["mean"], width, yerr=row["std"], color=f"C{i}", label=None if labelled else method,
                   capsize=2)
            labelled = True
            ax.text(x, row["mean"] + row["std"] + 0.01, str(row["seeds"]), ha="center", fontsize=6)
    for g, (task, setting) in enumerate(groups):
        majority = next(r["majority_rate"] for r in target if (r["task"], r["setting"]) == (task, setting))
        ax.hlines(majority, g - 0.45, g + 0.45, colors="k", linestyles="dashed", linewidth=0.8)
        zero = next((z["accuracy"] for z in zero_shot or [] if z["task"] == task), None)
        if zero is not None:
            ax.hlines(zero, g - 0.45, g + 0.45, colors="r", linestyles="dotted", linewidth=1.0)
    ax.legend(fontsize=7, ncol=2)
    ax.set_xticks(range(len(groups)), [f"{t}\n{s}" for t, s in groups], fontsize=8)
    ax.set_ylabel("test accuracy (mean ± std; number = seeds)")
    ax.set_title("Held-out target tasks (dashed: majority-class rate; dotted red: frozen model zero-shot)",
                 fontsize=9)


def _forest(ax, comparisons: list[dict], by_seed: list[dict]) -> None:
    labels = [f"{c['a']} - {c['b']}, {c['setting']}" for c in comparisons]
    for y, c in enumerate(comparisons):
        lo, hi = c["ci90"]
        ax.hlines(y, lo, hi, colors="k", linewidth=1.5)
        ax.plot(c["diff_mean"], y, "o", color="C0" if lo > 0 else ("C1" if lo > -0.02 else "C3"))
        mine = [s for s in by_seed if (s["a"], s["b"], s["setting"]) == (c["a"], c["b"], c["setting"])]
        step = 0.6 / (len(mine) + 1)
        for k, s in enumerate(sorted(mine, key=_stage_label)):
            dy = step * (k + 1)
            ax.hlines(y + dy, *s["ci90"], colors="gray", linewidth=0.6)
            ax.plot(s["diff_mean"], y + dy, "o", mfc="none", mec="gray", markersize=3)
            ax.text(s["ci90"][1], y + dy, f" {_stage_label(s)}", fontsize=5, va="center", color="gray")
    ax.axvline(0.0, color="k", linewidth=0.8)
    ax.axvline(-0.02, color="gray", linestyle="dashed", linewidth=0.8)
    if any(c["b"] == "lora" for c in comparisons):
        ax.axvline(-0.05, color="C3", linestyle="dotted", linewidth=0.8)
    ax.set_yticks(range(len(comparisons)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.locator_params(axis="x", nbins=5)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("paired difference of mean accuracy (90 % interval)", fontsize=8)
    ax.set_title("Paired bootstrap (dashed: the -0.02 margin; dotted: LoRA's -0.05;\n"
                 "gray: one source stage at a time)", fontsize=8)


def _stage_label(row: dict) -> str:
    """"s0/s1": the source stage of each side of a stage-pair row ("-": none); "s0" for a row of
    ``stats.by_source_seed`` (the same stage on both sides)."""
    if "stage_a" not in row:
        return f"s{row['source_seed']}"
    return "/".join("-" if s is None else f"s{s}" for s in (row["stage_a"], row["stage_b"]))


def markdown_zero_shot(zero_shot: list[dict]) -> str:
    lines = ["| task | zero-shot accuracy | majority | macro-F1 |", "|---|---|---|---|"]
    lines += [f"| {z['task']} | {z['accuracy']:.3f} | {z['majority_rate']:.3f} | {z['macro_f1']:.3f} |"
              for z in zero_shot]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The summary rows as a Markdown table (docs/quality.md pastes it)."""
    lines = ["| role | task | setting | method | accuracy (mean ± std) | runs | majority | macro-F1 | params/task "
             "| shared params | s/step | wall s/run |", "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['role']} | {r['task']} | {r['setting']} | {r['method']} | {r['mean']:.3f} ± {r['std']:.3f} "
                     f"| {r['seeds']} | {r['majority_rate']:.3f} | {r['macro_f1_mean']:.3f} | {r['params_per_task']:,} "
                     f"| {r['shared_params']:,} | {r['seconds_per_step_median']:.1f} | {r['wall_s_mean']:.0f} |")
    return "\n".join(lines)


def markdown_means(means: list[dict], comparisons: list[dict]) -> str:
    """Mean target accuracy per method and setting, then talora's paired differences."""
    settings = [s for s in SETTINGS if any(m["setting"] == s for m in means)]
    lines = ["| method | params/task | " + " | ".join(settings) + " |", "|---|---|" + "---|" * len(settings)]
    for method in [m for m in METHODS if any(x["method"] == m for x in means)]:
        cells = []
        for setting in settings:
            row = next((x for x in means if (x["method"], x["setting"]) == (method, setting)), None)
            cells.append("" if row is None else f"{row['mean']:.3f} (F1 {row['macro_f1']:.3f}; {row['runs']} runs)")
        params = next(x["params_per_task"] for x in means if x["method"] == method)
        lines.append(f"| {method} | {params:,} | " + " | ".join(cells) + " |")
    if comparisons:
        lines += ["", "| a | b | setting | a - b | 90% interval (source stages resampled) | source stages held "
                  "fixed | stage pairs: above 0 / below 0 / all | verdict | paired units |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['a']} | {c['b']} | {c['setting']} | {c['diff_mean']:+.3f} | {_ci(c['ci90'])} | "
                  f"{_ci(c.get('ci90_stages_fixed'))} | {c.get('stage_pairs_above_0', '')} / "
                  f"{c.get('stage_pairs_below_0', '')} / {c.get('stage_pairs', '')} | {c.get('verdict', '')} | "
                  f"{c['n_items']:,} |" for c in comparisons]
    return "\n".join(lines)


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def markdown_by_source_seed(by_seed: dict) -> str:
    """Each multi-task method's mean per source stage, then talora's comparisons on one source stage
    at a time."""
    lines = ["| method | setting | source seed | mean accuracy | runs |", "|---|---|---|---|---|"]
    lines += [f"| {m['method']} | {m['setting']} | {m['source_seed']} | {m['mean']:.3f} | {m['runs']} |"
              for m in by_seed["means"]]
    if by_seed["comparisons"]:
        lines += ["", "| a | b | setting | source stages (a/b) | a - b | 90% interval | paired units |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {c['a']} | {c['b']} | {c['setting']} | {_stage_label(c)} | {c['diff_mean']:+.3f} | "
                  f"[{c['ci90'][0]:+.3f}, {c['ci90'][1]:+.3f}] | {c['n_items']:,} |" for c in by_seed["comparisons"]]
    return "\n".join(lines)


def _learning_rate(result: dict) -> float:
    spec = result["spec"]
    return (spec.get("train") or spec.get("hyper"))["lr"]


# fields that say where a run is, what it adapts and how it is scored, not how it trains
_NOT_RECIPE = {"model", "output_dir", "seed", "device", "dtype", "threads", "progress", "split", "eval_limit",
               "eval_batch_size", "max_new_tokens", "tasks", "task_files", "bundle", "task", "shots", "eval_every",
               "save_every", "log_every", "resume"}


def from_rebuilt_source(target: dict, source: dict | None) -> bool:
    """Whether a target run started from another build of its source stage than the one the source
    stage's stored record scored (records without ``source_build`` came from the stored build)."""
    return bool(target.get("source_build")) and target["source_build"] != (source or {}).get("build")


def _changes(spec: dict, method: str, stage: str) -> list[str]:
    """The fields of one stage's spec that differ from what the committed recipe gives it
    (TA-LoRA: ``adapters/train/recipe.py``; PEFT: ``PeftRecipe`` and the recipe's budget), the
    learning rate of a target stage aside (the dev table has a column for it)."""
    from talora.adapters.train import recipe
    from talora.adapters.train.config import STAGE_FIELDS

    fields = recipe.defaults(stage)
    if "train" in spec:  # every training field of talora-train's stage counts, the recipe's or not (gate_init)
        if stage == "source":  # with the method's own switches as given
            full = {**recipe.source_config(tasks=["any"]).model_dump(), **TALORA_SWITCHES.get(method, {})}
        else:
            full = recipe.target_config(bundle="any", task="any").model_dump()
        want = {k: full[k] for k in set(STAGE_FIELDS[stage]) - _NOT_RECIPE}
        given = {**{k: v for k, v in ADDED_FIELDS.items() if k in want}, **spec["train"]}  # absent: old value
    else:
        hyper = PeftRecipe().method_hyper(method, stage)
        given = {**spec.get("budget", {}), **spec.get("hyper", {})}
        want = {**{k: v for k, v in fields.items() if k in spec.get("budget", {})}, **hyper}
    if want.get("max_input_tokens") == 0:  # the recipe's "by the task": a packaged task's
        want["max_input_tokens"] = recipe.PACKAGED_INPUT_TOKENS
    if want.get("train_limit", 0) < 0:  # the recipe's "by the task": a packaged task's
        want["train_limit"] = recipe.PACKAGED_TRAIN_LIMIT
    if want.get("steps") == 0:  # the recipe's budget for this run's training data
        want["steps"] = recipe.target_steps(spec["shots"], given["train_limit"], given["batch_size"])
    if want.get("task_basis_rows", 0) < 0:  # the recipe's rows for this run's training data
        want["task_basis_rows"] = recipe.target_basis_rows(spec["shots"], given["train_limit"],
                                                           TALORA_SWITCHES.get(method, {}).get("full_rank", False))
    skip = {"lr"} if stage == "target" else set()
    prefix = "source " if stage == "source" else ""
    return [f"{prefix}{k}={given[k]}" for k in sorted(want) if k not in skip and k in given and given[k] != want[k]]


def dev_table(results: list[dict]) -> str:
    """Dev-split target runs grouped by method, setting, target learning rate, what else differs
    from the recipe (either stage), and source seed: the mean accuracy of each task over the
    seeds found, and the mean over tasks (the tuning table)."""
    sources = {r["key"]: r for r in results if r["stage"] == "source"}
    groups: dict[tuple, dict[str, list[float]]] = {}
    for r in results:
        if r["stage"] == "target" and r["spec"]["eval_split"] == "dev":
            changes = _changes(r["spec"], r["method"], "target")
            source = sources.get(r["spec"].get("source"))
            if source is not None:
                changes = _changes(source["spec"], r["method"], "source") + changes
                if from_rebuilt_source(r, source):
                    changes.append(f"source rebuilt {r['source_build'][:8]}")  # not the build its record scored
            elif r["spec"].get("source"):
                changes.append("source not stored")
            src = "" if r.get("source_seed") is None or not r["spec"].get("source") else str(r["source_seed"])
            key = (r["method"], r["setting"], _learning_rate(r), ", ".join(changes) or "none", src)
            groups.setdefault(key, {}).setdefault(r["task"], []).append(r["metrics"][r["task"]]["accuracy"])
    tasks = sorted({t for g in groups.values() for t in g})
    lines = ["| method | setting | target lr | changes from the recipe | source seed | " + " | ".join(tasks)
             + " | mean over tasks |", "|---|---|---|---|---|" + "---|" * (len(tasks) + 1)]
    for (method, setting, lr, changes, src), by_task in sorted(groups.items()):
        cells = [f"{statistics.fmean(v):.3f} ({len(v)})" if (v := by_task.get(t)) else "" for t in tasks]
        complete = len(by_task) == len(tasks)
        mean = f"{statistics.fmean(statistics.fmean(v) for v in by_task.values()):.3f}" if complete else "incomplete"
        lines.append(f"| {method} | {setting} | {lr:g} | {changes} | {src} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines)

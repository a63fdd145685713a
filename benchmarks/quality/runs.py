"""Execute one planned run of the quality benchmark and return its result record.

TA-LoRA runs hand the run's ``TrainConfig`` (``Run.train``: the recipe, the benchmark's overrides,
the ablation switch) to the project's trainer (``talora.adapters.train.run_source`` /
``run_target``), with only bookkeeping fields (output folder, threads, progress) and the source
bundle's path filled in here. PEFT runs go through ``peft_baselines`` with the same budget fields.
Both read the same registry data the same way: source tasks ``load_split(train,
limit=train_limit)``; a target's full data ``load_split(train, limit=train_limit)``; k-shot
``k_shot(whole train split, k, seed)`` (k per label); the test subset ``load_split(split,
limit=test_limit)``.

A record holds the metrics and, per task, the predicted and gold label index of every test
item as digit strings (``"0210..."``), for the paired comparisons of ``stats``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.quality.plan import MULTITASK, TALORA_METHODS, Run
from benchmarks.quality.report import machine
from benchmarks.quality.sources import artifact_build
from talora.adapters.model.config import AdapterShape

ARTIFACTS = "artifacts"


def model_shape(model_name: str) -> dict:
    """Hidden size, layers and heads from the checkpoint's config.json (no weights loaded)."""
    from benchmarks.quality.peft_baselines import model_dir

    cfg = json.loads((model_dir(model_name) / "config.json").read_text())
    return {"d": cfg["hidden_size"], "L": cfg["num_hidden_layers"], "H": cfg["num_attention_heads"]}


def talora_params(talora: dict, shape: dict) -> tuple[int, int]:
    """(parameters stored per task, shared parameters) of a TA-LoRA adapter shape: B_t (n x r,
    or n x d full rank; L times that with a deep prompt; k more columns U_t and k rows V_t (k x d)
    with ``task_basis_rows`` k) + g_t (L x H, only when gated); shared P (m x d) + A (r x d)."""
    d, L, H = shape["d"], shape["L"], shape["H"]
    full, k = talora["full_rank"], talora.get("task_basis_rows", 0)
    adapter = AdapterShape(**{k: talora[k] for k in AdapterShape.model_fields if k in talora})
    fast = math.prod(adapter.fast_shape(L, d, k)) + k * d
    gate = L * H if talora["gated"] else 0
    return fast + gate, talora["shared_prompt_len"] * d + (0 if full else talora["rank"] * d)


def peft_params(method: str, hyper: dict, shape: dict) -> tuple[int, int]:
    """PromptTuning: V x d. MPT: PEFT trains the whole prompt encoder per target (V x d + V x r + r x d)."""
    d = shape["d"]
    if method == "prompt_tuning":
        return hyper["num_virtual_tokens"] * d, 0
    if method == "mpt":
        v, r = hyper["num_virtual_tokens"], hyper["num_ranks"]
        return v * d + v * r + r * d, 0
    raise ValueError(f"peft_params: {method!r} is counted from the trained model")


def _examples(task: str, split: str, limit: int | None):
    from talora.adapters.data import load_split

    return load_split(task, split, limit=limit or None)


def target_train_examples(task: str, shots: int, train_limit: int, kind: str, seed: int):
    from talora.adapters.train.data import k_shot

    if shots:
        return k_shot(_examples(task, "train", None), shots, kind, seed)
    return _examples(task, "train", train_limit)


def digits(values: list[int]) -> str:
    """Label indices as one digit string (every task here has at most 10 labels)."""
    if any(not 0 <= v < 10 for v in values):
        raise ValueError("digits: label indices must be 0..9")
    return "".join(str(v) for v in values)


# ----- TA-LoRA -------------------------------------------------------------------------------
def run_talora(run: Run, artifacts: Path, scratch_root: Path, threads: int, progress: bool) -> dict:
    from talora.adapters.train import run_source, run_target

    book: dict[str, Any] = dict(threads=threads, progress=progress, save_every=0)
    assert run.train is not None, run.key  # every TA-LoRA run carries its TrainConfig
    if run.stage == "source":
        out = artifacts / run.key
        shutil.rmtree(out, ignore_errors=True)
        summary = run_source(run.train.with_updates(output_dir=str(out), **book))
        return _talora_body(summary, out / "log.jsonl")
    scratch = scratch_root / f"{run.key}-{os.getpid()}"  # two sittings may share the artifacts
    shutil.rmtree(scratch, ignore_errors=True)
    bundle = artifacts / run.spec["source"] / "bundle"
    try:
        summary = run_target(run.train.with_updates(bundle=str(bundle), output_dir=str(scratch), **book))
        body = _talora_body(summary, scratch / "log.jsonl")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {**body, "train_examples": summary["train_examples"], "init": summary["init"]}


def _talora_body(summary: dict, log_path: Path) -> dict:
    return {"metrics": summary["metrics"], "final_loss": summary["final_loss"],
            "seconds_per_step": summary["seconds_per_step"], "gate_abs_tanh": _last_gate_opening(log_path),
            "diverged": summary.get("diverged"), "restored_step": summary.get("restored_step"),
            "predictions": {t: digits(p) for t, p in summary["predictions"].items()},
            "gold": {t: digits(g) for t, g in summary["gold"].items()}}


def _last_gate_opening(log_path: Path) -> float | None:
    """Mean |tanh(g)| of the trained gates at the last logged step (the trainer's log)."""
    if not log_path.is_file():
        return None
    steps = [row for row in map(json.loads, log_path.read_text().splitlines()) if row.get("kind") == "step"]
    return steps[-1]["gate_abs_tanh"] if steps else None


# ----- PEFT ----------------------------------------------------------------------------------
def _encode(tok, names: list[str], split: str, limit, max_tokens: int):
    from talora.adapters.data import get_task
    from talora.adapters.train.data import encode_task

    return [encode_task(get_task(n), _examples(n, split, limit), tok, max_tokens) for n in names]


def _build_peft(method: str, base, hyper: dict, seed: int, num_tasks: int, source_file: Path | None):
    from benchmarks.quality import peft_baselines as qp

    if method == "prompt_tuning":
        return qp.build_prompt_tuning(base, hyper, seed)
    if method == "mpt":
        return qp.build_mpt(base, hyper, seed, num_tasks, source_file)
    return qp.build_lora(base, hyper, seed, source_file)


def run_peft(run: Run, artifacts: Path, progress: bool) -> dict:
    from benchmarks.quality import peft_baselines as qp
    from talora.adapters.data import get_task
    from talora.adapters.train.data import encode_task

    s = run.spec
    budget = s.get("budget", {})
    base, tok = qp.load_base(s["model"], run_dtype(s))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if run.stage == "reference":
        test = _encode(tok, [s["task"]], s["eval_split"], s["test_limit"], s["max_input_tokens"])[0]
        return _peft_scores({test.name: qp.evaluate(base, test, None, pad_id, True)}, [test]) | {
            "final_loss": None, "seconds_per_step": 0.0, "trainable_params": 0}
    h = s["hyper"]
    real_positions, multitask_ids = run.method == "lora", run.method == "mpt"
    max_tokens = budget["max_input_tokens"]
    if run.stage == "source":
        names = sorted(s["tasks"])  # the trainer's task order, so both draw the same batches
        train_tasks = _encode(tok, names, "train", budget["train_limit"], max_tokens)
        test_tasks = _encode(tok, names, s["eval_split"], s["test_limit"], max_tokens)
        model = _build_peft(run.method, base, h, s["seed"], len(names), None)
    else:
        spec = get_task(s["task"])
        examples = target_train_examples(s["task"], s["shots"], budget["train_limit"], spec.kind, s["seed"])
        train_tasks = [encode_task(spec, examples, tok, max_tokens)]
        test_tasks = _encode(tok, [s["task"]], s["eval_split"], s["test_limit"], max_tokens)
        source_file = artifacts / s["source"] / "source.safetensors" if s["source"] else None
        model = _build_peft(run.method, base, h, s["seed"], 1, source_file)
    trained = qp.train(model, train_tasks, qp.Budget.from_spec(budget, h["lr"]), s["seed"], pad_id, multitask_ids,
                       real_positions, progress)
    scores = {t.name: qp.evaluate(model, t, i if multitask_ids else None, pad_id, real_positions)
              for i, t in enumerate(test_tasks)}
    if run.stage == "source":
        qp.save_source(model, run.method, artifacts / run.key / "source.safetensors")
    out = {**_peft_scores(scores, test_tasks), "final_loss": trained["final_loss"],
           "seconds_per_step": trained["seconds_per_step"], "trainable_params": qp.trainable_params(model)}
    if run.stage == "target":
        out["train_examples"] = len(train_tasks[0].examples)
    return out


def _peft_scores(scores: dict, tasks) -> dict:
    metrics = {name: {k: v for k, v in m.items() if k != "predictions"} for name, m in scores.items()}
    gold = {t.name: digits([t.labels.index(ex.label) for ex in t.examples]) for t in tasks}
    return {"metrics": metrics, "predictions": {n: digits(m["predictions"]) for n, m in scores.items()}, "gold": gold}


# ----- one run -------------------------------------------------------------------------------
def execute(run: Run, artifacts: Path, scratch: Path, threads: int = 1, progress: bool = True) -> dict:
    """Train and evaluate ``run``; the result record that ``plan.save_result`` stores."""
    tic = time.perf_counter()
    if run.method in TALORA_METHODS:
        body = run_talora(run, Path(artifacts), Path(scratch), threads, progress)
    else:
        body = run_peft(run, Path(artifacts), progress)
    shape = model_shape(run.spec["model"])
    if run.method == "lora" or run.stage == "reference":
        per_task, shared = body.pop("trainable_params"), 0
    elif run.method in TALORA_METHODS:
        talora = run.spec["train"] if run.stage == "source" else json.loads(
            (Path(artifacts) / run.spec["source"] / "bundle" / "talora.json").read_text())["talora"]
        rows = run.spec["train"].get("task_basis_rows", 0)  # a field of the trained tasks, not of the bundle
        per_task, shared = talora_params({**talora, "task_basis_rows": rows}, shape)
    else:
        body.pop("trainable_params", None)
        per_task, shared = peft_params(run.method, run.spec["hyper"], shape)
    if run.stage == "source":
        body["build"] = artifact_build(Path(artifacts) / run.key)
    elif needs_source(run):
        body["source_build"] = artifact_build(Path(artifacts) / run.spec["source"])
    return {"key": run.key, "method": run.method, "stage": run.stage, "task": run.task, "setting": run.setting,
            "seed": run.seed, "source_seed": run.source_seed, "spec": run.spec, "params_per_task": per_task,
            "shared_params": shared, "wall_s": round(time.perf_counter() - tic, 2), "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "machine": machine(),
            **half_matmul(run.spec), **body}


def run_dtype(spec: dict) -> str:
    """The frozen model's dtype of a run: its ``TrainConfig``'s (TA-LoRA), its budget's (PEFT
    methods) or the spec's own (references); float32 when none names one."""
    return spec.get("train", {}).get("dtype") or spec.get("budget", {}).get("dtype") or spec.get("dtype", "float32")


def half_matmul(spec: dict) -> dict:
    """``{"half_matmul": "native" | "float32"}`` for a run whose frozen model is 16-bit: whether its
    products ran on the CPU's native 16-bit kernels or through float32 ones
    (``talora.adapters.precision``); ``{}`` for a float32 run."""
    from talora.adapters.model.precision import HALF, float_matmul_needed

    dtype = getattr(torch, run_dtype(spec))
    if dtype not in HALF:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {"half_matmul": "float32" if float_matmul_needed(dtype, device) else "native"}


def store_source_result(runs_dir: Path, result: dict) -> str:
    """Store a source stage's record; returns what happened ("new", "same" or "rebuilt").

    A source stage is rerun when its weights are missing (a new machine). The stored record keeps
    describing the build the stored target runs came from: a rebuild that scores the same items
    the same way only adds its build id; one that does not is kept beside it in
    ``rebuilds/<key>-<build>.json``, and the target runs trained from it carry its build id
    (``source_build``), which ``--dev-table`` reports as "source rebuilt"."""
    from benchmarks.quality.plan import load_result, save_result

    key = result["key"]
    stored = load_result(runs_dir, key)
    if stored is None or stored.get("build") == result["build"]:
        save_result(runs_dir, key, result)
        return "new" if stored is None else "same"
    if "build" not in stored and stored.get("predictions") == result.get("predictions"):
        save_result(runs_dir, key, {**stored, "build": result["build"]})
        return "same"
    save_result(Path(runs_dir) / "rebuilds", f"{key}-{result['build'][:8]}", {**result, "rebuild_of": key})
    return "rebuilt"


def needs_source(run: Run) -> bool:
    return run.stage == "target" and run.method in MULTITASK


__all__ = ["execute", "needs_source", "artifact_build", "store_source_result", "talora_params",
           "peft_params"]

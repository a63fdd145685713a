"""Execute one planned run of the quality benchmark and return its result record.

TA-LoRA runs call the project's trainer (``talora.adapters.train.run_source`` / ``run_target``),
which trains on the cached path and scores the test subset by label log-likelihood. PEFT runs
go through ``quality_peft``. Both read the same registry data the same way: source tasks
``load_split(train, limit=source_train_limit)``; a target's full data
``load_split(train, limit=full_train_limit)``; k-shot ``k_shot(whole train split, k, seed)``
(k per label); the test subset ``load_split(test, limit=test_limit)``.
Source artifacts (a TA-LoRA bundle or a PEFT weight file) live in ``<cache>/artifacts/<key>``;
target runs write to a scratch folder that is deleted once their result is recorded.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from quality_plan import MULTITASK, TALORA_METHODS, Run

ARTIFACTS = "artifacts"


def model_shape(model_name: str) -> dict:
    """Hidden size, layers and heads from the checkpoint's config.json (no weights loaded)."""
    from quality_peft import model_dir

    cfg = json.loads((model_dir(model_name) / "config.json").read_text())
    return {"d": cfg["hidden_size"], "L": cfg["num_hidden_layers"], "H": cfg["num_attention_heads"]}


def params_per_task(method: str, hyper: dict, shape: dict, num_sources: int) -> tuple[int, int]:
    """(trained parameters stored per target task, shared parameters stored once) of ``method``.

    TA-LoRA: B_t (n x r, or n x d full rank) + g_t (L x H, only when gated); shared P (m x d) + A.
    PromptTuning: V x d. MPT: PEFT trains the whole prompt encoder per target (V x d + V x r + r x d).
    LoRA: every LoRA matrix (fine-tuned per target from the multi-task LoRA).
    """
    d, L, H = shape["d"], shape["L"], shape["H"]
    if method in TALORA_METHODS:
        full = hyper.get("full_rank", False)
        fast = hyper["task_prompt_len"] * (d if full else hyper["rank"])
        gate = L * H if hyper.get("gated", True) else 0
        return fast + gate, hyper["shared_prompt_len"] * d + (0 if full else hyper["rank"] * d)
    if method == "prompt_tuning":
        return hyper["num_virtual_tokens"] * d, 0
    if method == "mpt":
        v, r = hyper["num_virtual_tokens"], hyper["num_ranks"]
        return v * d + v * r + r * d, 0
    raise ValueError(f"params_per_task: {method!r} is counted from the trained model")


def _examples(task: str, split: str, limit: int | None):
    from talora.adapters.tasks import load_split

    return load_split(task, split, limit=limit or None)


def target_train_examples(spec: dict, kind: str):
    from talora.adapters.train.data import k_shot

    if spec["shots"]:
        return k_shot(_examples(spec["task"], "train", None), spec["shots"], kind, spec["seed"])
    return _examples(spec["task"], "train", spec["train_limit"])


# ----- TA-LoRA -------------------------------------------------------------------------------
def _talora_config(run: Run, output_dir: Path, bundle: Path | None, progress: bool):
    from talora.adapters.train import TrainConfig

    s, h = run.spec, dict(run.spec["hyper"])
    common = dict(model=s["model"], steps=s["steps"], batch_size=s["batch_size"], lr=h["lr"], seed=s["seed"],
                  gate_lr_ratio=h["gate_lr_ratio"], slow_lr_ratio=h.get("slow_lr_ratio", 0.1),
                  max_input_tokens=s["max_input_tokens"], train_limit=s["train_limit"], split=s["eval_split"],
                  eval_limit=s["test_limit"], output_dir=str(output_dir), save_every=0, progress=progress)
    if run.stage == "source":
        return TrainConfig(stage="source", tasks=list(s["tasks"]), sampling_temperature=s["sampling_temperature"],
                           shared_prompt_len=h["shared_prompt_len"], task_prompt_len=h["task_prompt_len"],
                           rank=h["rank"], gated=h.get("gated", True), full_rank=h.get("full_rank", False), **common)
    return TrainConfig(stage="target", bundle=str(bundle), task=s["task"], shots=s["shots"],
                       target_init=h["target_init"], **common)


def run_talora(run: Run, cache_dir: Path, progress: bool) -> dict:
    from talora.adapters.train import run_source, run_target

    if run.stage == "source":
        out = Path(cache_dir) / ARTIFACTS / run.key
        shutil.rmtree(out, ignore_errors=True)
        summary = run_source(_talora_config(run, out, None, progress))
        return {"metrics": summary["metrics"], "final_loss": summary["final_loss"],
                "seconds_per_step": summary["seconds_per_step"], "gate_abs_tanh": _last_gate_opening(out / "log.jsonl")}
    bundle = Path(cache_dir) / ARTIFACTS / run.spec["source"] / "bundle"
    scratch = Path(cache_dir) / "scratch" / f"{run.key}-{os.getpid()}"  # two sittings may share a cache
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        summary = run_target(_talora_config(run, scratch, bundle, progress))
        gate = _last_gate_opening(scratch / "log.jsonl")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"metrics": summary["metrics"], "final_loss": summary["final_loss"],
            "seconds_per_step": summary["seconds_per_step"], "train_examples": summary["train_examples"],
            "init": summary["init"], "gate_abs_tanh": gate}


def _last_gate_opening(log_path: Path) -> float | None:
    """Mean |tanh(g)| of the trained gates at the last logged step (the trainer's log)."""
    if not log_path.is_file():
        return None
    steps = [row for row in map(json.loads, log_path.read_text().splitlines()) if row.get("kind") == "step"]
    return steps[-1]["gate_abs_tanh"] if steps else None


# ----- PEFT ----------------------------------------------------------------------------------
def _encode(tok, names: list[str], split: str, limit, max_tokens: int):
    from talora.adapters.tasks import get_task
    from talora.adapters.train.data import encode_task

    return [encode_task(get_task(n), _examples(n, split, limit), tok, max_tokens) for n in names]


def _build_peft(method: str, base, hyper: dict, seed: int, num_tasks: int, source_file: Path | None):
    import quality_peft as qp

    if method == "prompt_tuning":
        return qp.build_prompt_tuning(base, hyper, seed)
    if method == "mpt":
        return qp.build_mpt(base, hyper, seed, num_tasks, source_file)
    return qp.build_lora(base, hyper, seed, source_file)


def run_peft(run: Run, cache_dir: Path, progress: bool) -> dict:
    import quality_peft as qp
    from talora.adapters.tasks import get_task
    from talora.adapters.train.data import encode_task

    s, h = run.spec, run.spec["hyper"]
    base, tok = qp.load_base(s["model"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if run.stage == "reference":
        test = _encode(tok, [s["task"]], s["eval_split"], s["test_limit"], s["max_input_tokens"])[0]
        return {"metrics": {test.name: qp.evaluate(base, test, None, pad_id, True)}, "final_loss": None,
                "seconds_per_step": 0.0, "trainable_params": 0}
    real_positions, multitask_ids = run.method == "lora", run.method == "mpt"
    if run.stage == "source":
        names = sorted(s["tasks"])  # the trainer's task order, so both draw the same batches
        train_tasks = _encode(tok, names, "train", s["train_limit"], s["max_input_tokens"])
        test_tasks = _encode(tok, names, s["eval_split"], s["test_limit"], s["max_input_tokens"])
        model = _build_peft(run.method, base, h, s["seed"], len(names), None)
        source_file = None
    else:
        spec = get_task(s["task"])
        train_tasks = [encode_task(spec, target_train_examples(s, spec.kind), tok, s["max_input_tokens"])]
        test_tasks = _encode(tok, [s["task"]], s["eval_split"], s["test_limit"], s["max_input_tokens"])
        source_file = Path(cache_dir) / ARTIFACTS / s["source"] / "source.safetensors" if s["source"] else None
        model = _build_peft(run.method, base, h, s["seed"], 1, source_file)
    trained = qp.train(model, train_tasks, s["steps"], s["batch_size"], h["lr"], s["seed"],
                       s.get("sampling_temperature", 2.0), pad_id, multitask_ids, real_positions, progress,
                       h.get("lr_schedule", "constant"))
    metrics = {t.name: qp.evaluate(model, t, i if multitask_ids else None, pad_id, real_positions)
               for i, t in enumerate(test_tasks)}
    if run.stage == "source":
        qp.save_source(model, run.method, Path(cache_dir) / ARTIFACTS / run.key / "source.safetensors")
    out = {"metrics": metrics, "final_loss": trained["final_loss"], "seconds_per_step": trained["seconds_per_step"],
           "trainable_params": qp.trainable_params(model)}
    if run.stage == "target":
        out["train_examples"] = len(train_tasks[0].examples)
    return out


# ----- one run -------------------------------------------------------------------------------
def source_ready(run: Run, cache_dir: Path) -> bool:
    """Whether a finished source run's artifact is still on disk."""
    folder = Path(cache_dir) / ARTIFACTS / run.key
    name = "bundle" if run.method in TALORA_METHODS else "source.safetensors"
    return (folder / name).exists()


def execute(run: Run, cache_dir: Path, progress: bool = True) -> dict:
    """Train and evaluate ``run``; the result record that ``quality_plan.save_result`` stores."""
    tic = time.perf_counter()
    body = run_talora(run, cache_dir, progress) if run.method in TALORA_METHODS else run_peft(run, cache_dir, progress)
    shape = model_shape(run.spec["model"])
    num_sources = len(run.spec.get("tasks", [])) if run.stage == "source" else 0
    if run.method == "lora" or run.stage == "reference":
        per_task, shared = body["trainable_params"], 0
    else:
        per_task, shared = params_per_task(run.method, run.spec["hyper"], shape, num_sources)
    return {"key": run.key, "method": run.method, "stage": run.stage, "task": run.task, "setting": run.setting,
            "seed": run.seed, "spec": run.spec, "params_per_task": per_task, "shared_params": shared,
            "wall_s": time.perf_counter() - tic, "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu", **body}


def needs_source(run: Run) -> bool:
    return run.stage == "target" and run.method in MULTITASK


__all__ = ["execute", "source_ready", "needs_source", "params_per_task"]

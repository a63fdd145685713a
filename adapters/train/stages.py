"""The three ``talora-train`` stages: ``run_source``, ``run_target``, ``run_eval``.

Each takes a ``TrainConfig`` and returns a JSON-able summary (also written to
``<output_dir>/summary.json`` by the training stages). Training stages write the adapter files
to ``<output_dir>/bundle`` in the format of ``talora.adapters.formats.io``, read every file back and
compare it with the trained tensors before reporting success.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from talora.adapters.data.spec import TaskSpec
from talora.adapters.formats.bundle import export_bundle, export_task, model_from_bundle
from talora.adapters.formats.io import BUNDLE_FILE, SHARED_FILE, load_bundle
from talora.adapters.model.talora_model import TaloraModel
from talora.adapters.train import recipe
from talora.adapters.train.checkpoint import trained_state
from talora.adapters.train.config import TrainConfig
from talora.adapters.train.data import EncodedTask, encode_task, k_shot, text_lengths
from talora.adapters.train.distributed import Runtime, barrier, init_runtime, shutdown
from talora.adapters.train.evaluate import evaluate_task
from talora.adapters.train.logs import LOG_FILE, plot_curves
from talora.adapters.train.objective import AnswerLoss, pack_batch
from talora.adapters.train.trainer import build_optimizer, train

BUNDLE_DIR = "bundle"

log = logging.getLogger(__name__)


def _specs(cfg: TrainConfig, names: list[str]) -> dict[str, TaskSpec]:
    """Registry specs of ``names``, registering ``cfg.task_files`` first."""
    from talora.adapters.data import get_task, register_file_task

    for path in cfg.task_files:
        register_file_task(path)
    return {name: get_task(name) for name in names}


def _load_examples(name: str, split: str, limit: int):
    from talora.adapters.data import load_split

    return load_split(name, split, limit=limit or None)


def _file_task_names(cfg: TrainConfig) -> list[str]:
    from talora.adapters.data.file_task import task_name_for

    return [task_name_for(Path(p)) for p in cfg.task_files]


def _setup(cfg: TrainConfig):
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runtime = init_runtime(cfg.device)
    from talora.adapters.model.loading import load_model

    return runtime, load_model(cfg.model, cfg.dtype, runtime.device)


class _Eval:
    """Scores ``eval_tasks``: metrics per task, each with its per-item ``predictions``;
    ``gold`` holds the gold label index (or answers) of every item."""

    def __init__(self, model: TaloraModel, eval_tasks: list[EncodedTask], tokenizer, cfg: TrainConfig):
        self.model, self.tasks, self.tokenizer, self.cfg = model, eval_tasks, tokenizer, cfg
        self.gold = {t.name: [t.labels.index(ex.label) for ex in t.examples] if t.kind == "classify"
                     else [list(ex.answers) for ex in t.examples] for t in eval_tasks}

    def __call__(self) -> dict:
        return {t.name: evaluate_task(self.model, t, self.tokenizer, self.cfg.eval_batch_size, self.cfg.max_new_tokens)
                for t in self.tasks}

    def final(self, result, log_dir: Path, step: int) -> tuple[dict, dict]:
        """(metrics, predictions) of the trained tensors: the training loop's last evaluation of
        them if it made one, else a new one (logged)."""
        metrics = result.final_metrics
        if metrics is None:
            metrics = self()
            from talora.adapters.train.logs import JsonlLog

            JsonlLog(log_dir / LOG_FILE).write({"kind": "eval", "step": step, "metrics": metrics})
        metrics = {name: dict(m) for name, m in metrics.items()}
        return metrics, {name: m.pop("predictions") for name, m in metrics.items()}





def verify_export(folder: Path, model: TaloraModel, base_fingerprint: str, tasks: list[str]) -> None:
    """Read the written bundle and task files back; raise if any tensor differs from ``model``."""
    loaded, _, _ = model_from_bundle(model.lm, folder, base_fingerprint, tasks, model.prompt.dtype)
    expected = {k: v for k, v in trained_state(model).items()
                if not k.startswith("tasks.") or k.split(".")[1] in tasks}
    got = trained_state(loaded)
    if set(got) != set(expected):
        raise RuntimeError(f"export check: {folder} holds {sorted(got)}, expected {sorted(expected)}")
    for name, tensor in expected.items():
        if not torch.equal(got[name].cpu(), tensor.cpu()):
            raise RuntimeError(f"export check: {name} read back from {folder} differs from the trained tensor")


def _training_summary(cfg: TrainConfig, result, runtime: Runtime, seconds: float) -> dict:
    return {"stage": cfg.stage, "steps": cfg.steps, "batch_size": cfg.batch_size, "world_size": runtime.world_size,
            "lr": cfg.lr, "slow_lr_ratio": cfg.slow_lr_ratio, "gate_lr_ratio": cfg.gate_lr_ratio,
            "lr_schedule": cfg.lr_schedule, "warmup_steps": cfg.warmup_steps, "seed": cfg.seed,
            "sampling": cfg.sampling, "sampling_temperature": cfg.sampling_temperature,
            "max_input_tokens": cfg.max_input_tokens, "final_loss": result.final_loss,
            "basis_lr_ratio": cfg.basis_lr_ratio, "class_balance": cfg.class_balance, "dtype": cfg.dtype,
            "task_basis_rows": cfg.task_basis_rows,
            "diverged": result.diverged, "restored_step": result.restored_step,
            "skipped_steps": result.skipped_steps,
            "seconds_per_step": result.seconds_per_step, "wall_seconds": seconds, "device": str(runtime.device)}


def _finish(run_dir: Path, summary: dict, result, bundle_dir: Path, metrics: dict, eval_fn: _Eval,
            predictions) -> dict:
    """A stage's summary once its bundle is exported and verified: written to ``summary.json`` with
    the plots of its curves; the per-item predictions and gold labels go to the caller only."""
    summary.update(bundle=str(bundle_dir), metrics=metrics, verified=True, diverged=result.diverged,
                   restored_step=result.restored_step)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    summary["curves"] = [str(p) for p in plot_curves(run_dir / LOG_FILE, run_dir)]
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    summary["predictions"], summary["gold"] = predictions, eval_fn.gold
    return summary


# ----- source ------------------------------------------------------------------------------
def run_source(cfg: TrainConfig) -> dict:
    """Multi-task training of P, A (slow) and every task's B_t, g_t (fast); writes the bundle."""
    tic = time.perf_counter()
    runtime, loaded = _setup(cfg)
    try:
        names = sorted(set(cfg.tasks) | set(_file_task_names(cfg)))
        specs = _specs(cfg, names)
        tok = loaded.tokenizer
        train_tasks = [encode_task(specs[n], _load_examples(n, "train", cfg.train_limit), tok, cfg.max_input_tokens)
                       for n in names]
        eval_tasks = [encode_task(specs[n], _load_examples(n, cfg.split, cfg.eval_limit), tok, cfg.max_input_tokens)
                      for n in names]
        model = TaloraModel(loaded.model, cfg.talora(), torch.float32)
        gen = torch.Generator().manual_seed(cfg.seed)
        prompt_ids = tok(cfg.prompt_init_text, add_special_tokens=False)["input_ids"] if cfg.prompt_init_text else None
        model.init_shared(gen, cfg.basis_init, prompt_ids)
        for name in names:
            model.add_task(name, generator=gen, basis_rows=cfg.task_basis_rows)
        optimizer = build_optimizer(model, cfg, names, train_shared=True)
        run_dir = Path(cfg.output_dir)
        eval_fn = _Eval(model, eval_tasks, tok, cfg)
        result = train(cfg, model, train_tasks, optimizer, runtime, run_dir, eval_fn)
        summary = {"stage": "source", "ranks_agree": result.ranks_agree, "resumed_from": result.resumed_from,
                   "final_loss": result.final_loss, "seconds_per_step": result.seconds_per_step,
                   "world_size": runtime.world_size}
        if runtime.is_main:
            metrics, predictions = eval_fn.final(result, run_dir, cfg.steps)
            training = _training_summary(cfg, result, runtime, time.perf_counter() - tic)
            training["tasks"] = {t.name: len(t.examples) for t in train_tasks}
            bundle_dir = run_dir / BUNDLE_DIR
            meta = export_bundle(model, bundle_dir, loaded.name, loaded.fingerprint, training)
            for task in train_tasks:
                export_task(model, task.name, bundle_dir, meta, **task.export_fields(),
                            training={"stage": "source", "train_examples": len(task.examples),
                                      f"{cfg.split}_metrics": metrics[task.name]})
            verify_export(bundle_dir, model, loaded.fingerprint, names)
            summary = _finish(run_dir, summary, result, bundle_dir, metrics, eval_fn, predictions)
        barrier(runtime)
        return summary
    finally:
        shutdown(runtime)


# ----- target ------------------------------------------------------------------------------
@torch.no_grad()
def nearest_source_task(model: TaloraModel, sources: list[str], task: EncodedTask, probe: int = 32) -> str:
    """The source task whose B_t and g_t give the lowest answer loss on ``task``'s examples."""
    loss_fn = AnswerLoss(model)
    items = task.examples[:probe]
    best, best_loss = sources[0], float("inf")
    for source in sources:
        batch = pack_batch([(source, ex) for ex in items]).to(model.lm.device)
        loss = float(loss_fn(batch))
        if loss < best_loss:
            best, best_loss = source, loss
    return best


def _target_init(model: TaloraModel, sources: list[str], task: EncodedTask, cfg: TrainConfig):
    """``(B_target, g_target, name)``: B from the sources (``target_init``), g from the same sources with
    ``gate_init=source``; None where the tensor starts fresh (random B, zero gate)."""
    if cfg.target_init == "random" or not sources:
        return None, None, "random"
    picked = sources if cfg.target_init == "mean" else [nearest_source_task(model, sources, task)]
    name = "mean" if cfg.target_init == "mean" else f"nearest:{picked[0]}"
    shared_rank = model.fast_shape[-1]  # a source's own basis columns mean nothing to the target
    fast = torch.stack([model.adapter(s).fast.detach()[..., :shared_rank] for s in picked]).mean(0)
    if cfg.gate_init == "zero":
        return fast, None, name
    return fast, torch.stack([model.adapter(s).gate.detach() for s in picked]).mean(0), f"{name}+gate"


def run_target(cfg: TrainConfig) -> dict:
    """Adapt ``cfg.task`` from a source bundle: trains B_target and g_target (and P, A with train_shared)."""
    tic = time.perf_counter()
    runtime, loaded = _setup(cfg)
    try:
        model, bundle_meta, _ = model_from_bundle(loaded.model, Path(cfg.bundle), loaded.fingerprint,
                                                  param_dtype=torch.float32)
        sources = sorted(model.tasks.keys())
        if cfg.task in sources:
            raise ValueError(f"task: {cfg.task!r} is already a task of bundle {cfg.bundle}; pick a new task")
        spec = _specs(cfg, [cfg.task])[cfg.task]
        tok = loaded.tokenizer
        cfg, chosen, inputs = _target_data(cfg, spec, tok)
        train_task = encode_task(spec, chosen, tok, cfg.max_input_tokens)
        if not cfg.steps:
            cfg = cfg.with_updates(steps=recipe.target_steps(cfg.shots, len(train_task.examples), cfg.batch_size))
        if cfg.task_basis_rows < 0:
            cfg = cfg.with_updates(task_basis_rows=recipe.target_basis_rows(cfg.shots, len(train_task.examples),
                                                                            model.cfg.full_rank))
        eval_task = encode_task(spec, _load_examples(cfg.task, cfg.split, cfg.eval_limit), tok, cfg.max_input_tokens)
        init, gate, init_name = _target_init(model, sources, train_task, cfg)
        model.add_task(cfg.task, init, generator=torch.Generator().manual_seed(cfg.seed), gate=gate,
                       basis_rows=cfg.task_basis_rows)
        optimizer = build_optimizer(model, cfg, [cfg.task], train_shared=cfg.train_shared)
        run_dir = Path(cfg.output_dir)
        eval_fn = _Eval(model, [eval_task], tok, cfg)
        result = train(cfg, model, [train_task], optimizer, runtime, run_dir, eval_fn)
        inputs.update(train_texts_cut=train_task.cut, eval_texts=len(eval_task.examples),
                      eval_texts_cut=eval_task.cut)
        summary = {"stage": "target", "task": cfg.task, "init": init_name, "shots": cfg.shots, "steps": cfg.steps,
                   "train_examples": len(train_task.examples), "inputs": inputs, "ranks_agree": result.ranks_agree,
                   "final_loss": result.final_loss, "seconds_per_step": result.seconds_per_step}
        if runtime.is_main:
            metrics, predictions = eval_fn.final(result, run_dir, cfg.steps)
            training = {**_training_summary(cfg, result, runtime, time.perf_counter() - tic), "init": init_name,
                        "shots": cfg.shots, "train_examples": len(train_task.examples), "inputs": inputs,
                        f"{cfg.split}_metrics": metrics[cfg.task], "source_bundle": bundle_meta.fingerprint}
            bundle_dir = run_dir / BUNDLE_DIR
            meta = _target_bundle(cfg, model, bundle_meta, bundle_dir, loaded, training)
            export_task(model, cfg.task, bundle_dir, meta, **train_task.export_fields(), training=training)
            verify_export(bundle_dir, _only_task(model, cfg.task), loaded.fingerprint, [cfg.task])
            summary = _finish(run_dir, summary, result, bundle_dir, metrics, eval_fn, predictions)
        barrier(runtime)
        return summary
    finally:
        shutdown(runtime)


def is_user_task(spec) -> bool:
    """Whether ``spec`` is a user's own file task (``--task-files``, ``tasks add``), not a packaged one."""
    return str(getattr(spec, "source", "")).startswith("user file")


def _target_data(cfg: TrainConfig, spec, tokenizer) -> tuple[TrainConfig, list, dict]:
    """``(cfg, training examples, inputs)``: ``cfg`` with ``train_limit`` -1 and ``max_input_tokens`` 0 (the
    recipe's "by the task") set for this task (``recipe.target_train_limit``, ``target_input_tokens``;
    given values are kept), the examples it trains on, and what the run summary says about them
    (``inputs``: the choices, how they were made, the training examples available and left out).
    The choice is logged, with how many training texts it cuts."""
    user = is_user_task(spec)
    notes = []
    if cfg.train_limit < 0:
        cfg = cfg.with_updates(train_limit=recipe.target_train_limit(user))
        notes.append("train_limit by the task: " + ("all training examples of a user's file" if user else
                                                      f"{cfg.train_limit} for a packaged task"))
    pool = _load_examples(cfg.task, "train", 0 if cfg.shots else cfg.train_limit)
    chosen = k_shot(pool, cfg.shots, spec.kind, cfg.seed) if cfg.shots else pool
    available = len(pool) if cfg.shots or not cfg.train_limit else len(_load_examples(cfg.task, "train", 0))
    lengths = text_lengths(tokenizer, chosen)
    how = "given"
    if cfg.max_input_tokens == 0:
        cfg = cfg.with_updates(max_input_tokens=recipe.target_input_tokens(user, lengths))
        how = (f"by the task: the {recipe.USER_INPUT_QUANTILE:.0%} point of its training texts' token lengths, "
               f"at most {recipe.USER_INPUT_TOKENS_CAP}" if user else "by the task: the packaged tasks' "
               f"{recipe.PACKAGED_INPUT_TOKENS}")
    limit = min(cfg.max_input_tokens, spec.max_input_tokens)
    if limit < cfg.max_input_tokens:
        how += f"; the task's own limit {spec.max_input_tokens}"
    cut = sum(n > limit for n in lengths)
    inputs = {"max_input_tokens": limit, "max_input_tokens_from": how, "user_task": user,
              "train_limit": cfg.train_limit, "train_available": available,
              "train_left_out": available - len(pool) if not cfg.shots else 0,
              "train_texts": len(lengths), "train_text_tokens_max": max(lengths, default=0)}
    message = (f"target task {cfg.task!r}: inputs cut at {limit} tokens ({how}); {cut} of {len(lengths)} training "
               f"texts are cut (longest {inputs['train_text_tokens_max']} tokens); training on {len(chosen)} of "
               f"{available} training examples" + (f" ({'; '.join(notes)})" if notes else ""))
    (log.warning if user or cut else log.info)(message)
    return cfg, chosen, inputs


def _target_bundle(cfg, model, bundle_meta, bundle_dir: Path, loaded, training):
    """The bundle the target adapter belongs to: the source one copied, or a new one (train_shared)."""
    if cfg.train_shared:
        return export_bundle(model, bundle_dir, loaded.name, loaded.fingerprint, training)
    source = Path(cfg.bundle)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    if source.resolve() != bundle_dir.resolve():
        for name in (BUNDLE_FILE, SHARED_FILE):
            shutil.copyfile(source / name, bundle_dir / name)
    return load_bundle(bundle_dir, loaded.fingerprint)[0]


def _only_task(model: TaloraModel, task: str) -> TaloraModel:
    """A view of ``model`` with the shared tensors and one task (for the export check)."""
    view = TaloraModel(model.lm, model.cfg, model.prompt.dtype)
    view.prompt, view.basis = model.prompt, model.basis
    view.tasks[task] = model.tasks[task]
    return view


# ----- eval --------------------------------------------------------------------------------
def spec_from_meta(meta) -> SimpleNamespace:
    """A task description from a task adapter's metadata, so eval prompts match serving."""
    return SimpleNamespace(name=meta.task, kind=meta.kind, labels=tuple(meta.labels), verbalizers=meta.verbalizers,
                           template=meta.template, max_input_tokens=meta.max_input_tokens)


def run_eval(cfg: TrainConfig) -> dict:
    """Score a bundle's task adapter on ``cfg.split`` of the task's registry data."""
    runtime, loaded = _setup(cfg)
    try:
        model, _, metas = model_from_bundle(loaded.model, Path(cfg.bundle), loaded.fingerprint, [cfg.task])
        _specs(cfg, [])
        spec = spec_from_meta(metas[cfg.task])
        examples = _load_examples(cfg.task, cfg.split, cfg.eval_limit)
        task = encode_task(spec, examples, loaded.tokenizer, spec.max_input_tokens)
        metrics = evaluate_task(model, task, loaded.tokenizer, cfg.eval_batch_size, cfg.max_new_tokens)
        metrics.pop("predictions")
        return {"stage": "eval", "bundle": cfg.bundle, "task": cfg.task, "split": cfg.split, "metrics": metrics}
    finally:
        shutdown(runtime)

"""The optimisation loop shared by the source and target stages.

``build_optimizer`` makes AdamW with named groups: ``prompt`` (P at ``lr * slow_lr_ratio``),
``basis`` (A at ``lr * basis_lr_ratio``, or P's rate when that is 0), ``fast`` (each trained B_t
at ``lr``), ``task_basis`` (each trained task's own rows V_t, at ``lr`` like a prompt-tuning
prompt's rows, which are at the same embedding scale) and ``gate`` (each trained g_t at ``lr * gate_lr_ratio``).
``train`` runs ``cfg.steps`` steps of mixed-task batches (DDP-wrapped under ``torchrun``),
logs every step to JSONL, evaluates every ``eval_every`` steps on rank 0, writes resumable
checkpoints and resumes from the newest one with ``cfg.resume``.

Divergence: a step whose loss is not finite is skipped. ``DivergenceGuard`` tracks a smoothed
loss; when it climbs well above its best value the trainer warns, and with ``keep_best`` the
trained tensors of the best point (the best dev evaluation when ``eval_every`` > 0, otherwise the
lowest smoothed loss) are restored at the end if the run finished worse than that point.

Gates: while g_t = 0 the task prompt is invisible, so the first step moves only g_t (B_t and A
get an exactly-zero gradient); later steps scale their gradients by tanh(g_t), which AdamW's
per-coordinate normalisation cancels, so B_t and A need no warm-up of their own. AdamW moves
each gate by about its learning rate per step whatever its gradient, hence ``gate_lr_ratio``
(0.1 by default: at 0.3 the gates random-walk open, docs/training.md "Gates"); ``warmup_steps``
ramps every group up linearly.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from talora.adapters.model.talora_model import TaloraModel
from talora.adapters.train.checkpoint import list_checkpoints, load_checkpoint, restore, save_checkpoint, trained_state
from talora.adapters.train.config import TrainConfig
from talora.adapters.train.data import EncodedTask, MixedTaskSampler, label_groups
from talora.adapters.train.distributed import Runtime, all_mean, barrier, gather_objects
from talora.adapters.train.logs import LOG_FILE, JsonlLog
from talora.adapters.train.objective import AnswerLoss, pack_batch


def build_optimizer(model: TaloraModel, cfg: TrainConfig, tasks: list[str], train_shared: bool) -> torch.optim.AdamW:
    """AdamW over the trained tensors only; every other adapter tensor is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    shared = [(name, p) for name, p in (("prompt", model.prompt), ("basis", model.basis)) if train_shared and p.numel()]
    basis_ratio = cfg.basis_lr_ratio or cfg.slow_lr_ratio
    groups = [(name, [p], cfg.lr * (cfg.slow_lr_ratio if name == "prompt" else basis_ratio)) for name, p in shared]
    adapters = [model.adapter(t) for t in tasks]
    groups += [("fast", [a.fast for a in adapters], cfg.lr),
               ("task_basis", [a.basis for a in adapters if a.basis is not None], cfg.lr),
               ("gate", [a.gate for a in adapters], cfg.lr * cfg.gate_lr_ratio)]
    param_groups = []
    for name, params, lr in groups:
        if params:
            for p in params:
                p.requires_grad_(True)
            param_groups.append({"name": name, "params": params, "lr": lr, "base_lr": lr})
    return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at 0-based ``step``: linear warm-up, then the schedule."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - progress


def state_digest(model: TaloraModel) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(trained_state(model).items()):
        digest.update(name.encode())
        digest.update(tensor.float().cpu().numpy().tobytes())
    return digest.hexdigest()


class DivergenceGuard:
    """Smoothed training loss, its best point, and a copy of the trained tensors there.

    ``update(step, loss)`` returns True on the step the smoothed loss first rises to
    ``best * ratio + margin`` (a divergence); ``diverged_now`` says whether it is above that now.
    """

    def __init__(self, tensors: list[torch.Tensor], smoothing: float = 0.9, ratio: float = 1.5,
                 margin: float = 0.25, min_steps: int = 5):
        self.tensors, self.smoothing, self.ratio = tensors, smoothing, ratio
        self.margin, self.min_steps = margin, min_steps
        self.smoothed: float | None = None
        self.best, self.best_step = float("inf"), 0
        self.best_state: list[torch.Tensor] | None = None
        self.warned = False

    def update(self, step: int, loss: float) -> bool:
        previous = loss if self.smoothed is None else self.smoothed
        s = self.smoothed = self.smoothing * previous + (1 - self.smoothing) * loss
        if step >= self.min_steps and s < self.best:
            self.best, self.best_step = s, step
            self.best_state = [t.detach().clone() for t in self.tensors]
        if self.diverged_now and not self.warned:
            self.warned = True
            return True
        return False

    @property
    def diverged_now(self) -> bool:
        return self.smoothed is not None and self.best < float("inf") and \
            self.smoothed > self.best * self.ratio + self.margin


class BestEval:
    """The best dev evaluation so far (mean accuracy, or F1 for extraction) and its tensors."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors, self.score, self.step = tensors, -1.0, 0
        self.state: list[torch.Tensor] | None = None
        self.metrics: dict | None = None

    @staticmethod
    def score_of(metrics: dict) -> float:
        values = [m.get("accuracy", m.get("f1", 0.0)) for m in metrics.values()]
        return sum(values) / max(1, len(values))

    def update(self, step: int, metrics: dict | None) -> None:
        if metrics and self.score_of(metrics) > self.score:
            self.score, self.step, self.metrics = self.score_of(metrics), step, metrics
            self.state = [t.detach().clone() for t in self.tensors]


def _restore_tensors(tensors: list[torch.Tensor], state: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, saved in zip(tensors, state):
            t.copy_(saved)


@dataclass
class TrainResult:
    steps: int  # steps completed (cfg.steps)
    resumed_from: int  # step the run resumed from (0: fresh)
    final_loss: float  # mean loss of the last min(20, steps) logged steps
    seconds_per_step: float  # median wall time of this process's steps
    ranks_agree: bool  # every rank ended with bit-identical adapter tensors
    history: list[float] = field(default_factory=list)  # loss of each step run by this process
    diverged: bool = False  # the smoothed loss rose well above its best at some point
    restored_step: int | None = None  # the step whose trained tensors were restored (keep_best)
    skipped_steps: int = 0  # steps skipped for a non-finite loss
    final_metrics: dict | None = None  # evaluation of the returned tensors, when the loop made one


class _Evaluator:
    """Runs the dev evaluation on rank 0 and logs it; other ranks wait."""

    def __init__(self, fn, log: JsonlLog, runtime: Runtime):
        self.fn, self.log, self.runtime = fn, log, runtime

    def __call__(self, step: int) -> dict | None:
        metrics = None
        if self.fn is not None and self.runtime.is_main:
            metrics = self.fn()
            self.log.write({"kind": "eval", "step": step, "metrics": metrics})
        barrier(self.runtime)
        return metrics


def _wrap(loss_module: AnswerLoss, runtime: Runtime):
    if not runtime.distributed:
        return loss_module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # tasks absent from a rank's batch leave their B_t, g_t unused on that rank
    return DistributedDataParallel(loss_module, device_ids=device_ids, find_unused_parameters=True)


def _resume(cfg: TrainConfig, run_dir: Path, model, optimizer, sampler, runtime: Runtime, log: JsonlLog) -> int:
    found = list_checkpoints(run_dir) if cfg.resume else []
    if not found:
        if runtime.is_main:
            log.reset()
        barrier(runtime)
        return 0
    state = load_checkpoint(found[-1])
    if len(state["samplers"]) != runtime.world_size:
        raise ValueError(f"resume: the checkpoint was written by {len(state['samplers'])} processes, "
                         f"this run has {runtime.world_size}")
    restore(state, model, optimizer)
    sampler.load_state_dict(state["samplers"][runtime.rank])
    if runtime.is_main:
        log.truncate_after(state["step"])
    barrier(runtime)
    return int(state["step"])


def _checkpoint(cfg, run_dir, step, model, optimizer, sampler, runtime) -> None:
    states = gather_objects(sampler.state_dict(), runtime)
    if runtime.is_main:
        save_checkpoint(run_dir, step, model, optimizer, states, cfg.model_dump())
    barrier(runtime)


def _gate_opening(gates: list[torch.Tensor]) -> float:
    """Mean |tanh(g)| over the trained gates (0 when none are trained)."""
    return float(torch.stack([torch.tanh(g.detach()).abs().mean() for g in gates]).mean()) if gates else 0.0


def _warn(log: JsonlLog, step: int, message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.write({"kind": "warning", "step": step, "message": message})


def train(cfg: TrainConfig, model: TaloraModel, tasks: list[EncodedTask], optimizer, runtime: Runtime,
          run_dir: Path, eval_fn=None) -> TrainResult:
    """Optimise ``model`` on ``tasks`` for ``cfg.steps`` steps; see the module docstring."""
    run_dir = Path(run_dir)
    log = JsonlLog(run_dir / LOG_FILE, enabled=runtime.is_main)
    groups = [label_groups(t) for t in tasks] if cfg.class_balance == "sampler" else None
    sampler = MixedTaskSampler([len(t.examples) for t in tasks], cfg.sampling, cfg.sampling_temperature,
                               seed=cfg.seed * 1_000_003 + 7919 * (runtime.rank + 1), label_groups=groups)
    start = _resume(cfg, run_dir, model, optimizer, sampler, runtime, log)
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    gates = [p for g in optimizer.param_groups if g["name"] == "gate" for p in g["params"]]
    guard, best_eval = DivergenceGuard(trained), BestEval(trained)
    step_fn = _wrap(AnswerLoss(model), runtime)
    evaluate = _Evaluator(eval_fn, log, runtime)
    history, durations, skipped = [], [], 0
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"{cfg.stage} steps",
               disable=not (cfg.progress and runtime.is_main))
    model.train()
    for step in bar:
        tic = time.perf_counter()
        factor = lr_factor(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        items = [(tasks[t].name, tasks[t].examples[i]) for t, i in sampler.draw(cfg.batch_size)]
        batch = pack_batch(items).to(runtime.device)
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(batch)
        loss.backward()
        done = step + 1
        loss_value = all_mean(float(loss.detach()), runtime)
        if not math.isfinite(loss_value):
            skipped += 1
            _warn(log, done, f"step {done}: the loss is {loss_value}; the step was skipped")
        else:
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            optimizer.step()
            if guard.update(done, loss_value):
                _warn(log, done, f"step {done}: the training loss diverged (smoothed {guard.smoothed:.3f}, best "
                                 f"{guard.best:.3f} at step {guard.best_step}); lower lr or gate_lr_ratio")
        durations.append(time.perf_counter() - tic)
        history.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if done % cfg.log_every == 0 or done == cfg.steps:
            gate_open = _gate_opening(gates)
            log.write({"kind": "step", "step": done, "loss": loss_value, "lr": cfg.lr * factor,
                       "gate_abs_tanh": gate_open, "seconds": durations[-1],
                       "answer_tokens": int(batch.target_ids.numel()), "tasks": sorted({n for n, _ in items})})
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            best_eval.update(done, evaluate(done))
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            _checkpoint(cfg, run_dir, done, model, optimizer, sampler, runtime)
    bar.close()
    restored = _keep_best(cfg, trained, guard, best_eval, log)
    final_metrics = best_eval.metrics if restored is not None or best_eval.step == cfg.steps else None
    digests = gather_objects(state_digest(model), runtime)
    tail = history[-20:] if history else [float("nan")]
    median = sorted(durations)[len(durations) // 2] if durations else float("nan")
    return TrainResult(cfg.steps, start, sum(tail) / len(tail), median, len(set(digests)) == 1, history,
                       guard.warned, restored, skipped, final_metrics)


def _keep_best(cfg: TrainConfig, trained, guard: DivergenceGuard, best_eval: BestEval, log: JsonlLog) -> int | None:
    """Restore the best point's tensors (see the module docstring); returns its step or None."""
    if not cfg.keep_best:
        return None
    if best_eval.state is not None:
        if best_eval.step != cfg.steps:
            _restore_tensors(trained, best_eval.state)
            _warn(log, cfg.steps, f"kept the tensors of step {best_eval.step} (best dev score "
                                  f"{best_eval.score:.3f}); the last evaluation was lower")
            return best_eval.step
        return None
    if guard.diverged_now and guard.best_state is not None:
        _restore_tensors(trained, guard.best_state)
        _warn(log, cfg.steps, f"the run ended diverged; kept the tensors of step {guard.best_step} "
                              f"(smoothed loss {guard.best:.3f})")
        return guard.best_step
    return None

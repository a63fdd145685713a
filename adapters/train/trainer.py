"""The optimisation loop shared by the source and target stages.

``build_optimizer`` makes AdamW with named groups: ``slow`` (P and A at ``lr * slow_lr_ratio``),
``fast`` (each trained B_t at ``lr``) and ``gate`` (each trained g_t at ``lr * gate_lr_ratio``).
``train`` runs ``cfg.steps`` steps of mixed-task batches (DDP-wrapped under ``torchrun``),
logs every step to JSONL, evaluates every ``eval_every`` steps on rank 0, writes resumable
checkpoints and resumes from the newest one with ``cfg.resume``.

Gates and their warm-up: while g_t = 0 the task prompt is invisible, so B_t and A get an
exactly-zero gradient on the first step (AdamW leaves them unchanged, weight decay aside) while
g_t gets a non-zero one. From the second step on B_t and A get gradients scaled by tanh(g_t);
AdamW divides each coordinate's step by its gradient's running RMS, so that small scale does not
slow them down and no separate warm-up of B_t and A is needed. The gate learning rate is the
setting that matters: AdamW also moves each of the L x H gates by about its learning rate per
step whatever the size of its gradient, so with a gate learning rate of 0.3 noisy gates
random-walk open and, on SmolLM2, the source loss climbed from 5.8 to 9-14 within 10 steps.
Hence ``gate_lr_ratio`` defaults to 0.1 (gates at a tenth of the fast learning rate), and
``warmup_steps`` ramps every group up linearly.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from talora.adapters.talora_model import TaloraModel
from talora.adapters.train.checkpoint import list_checkpoints, load_checkpoint, restore, save_checkpoint, \
    trained_state
from talora.adapters.train.config import TrainConfig
from talora.adapters.train.data import EncodedTask, MixedTaskSampler
from talora.adapters.train.distributed import Runtime, all_mean, barrier, gather_objects
from talora.adapters.train.logs import LOG_FILE, JsonlLog
from talora.adapters.train.objective import AnswerLoss, pack_batch


def build_optimizer(model: TaloraModel, cfg: TrainConfig, tasks: list[str], train_shared: bool) -> torch.optim.AdamW:
    """AdamW over the trained tensors only; every other adapter tensor is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    slow = [p for p in (model.prompt, model.basis) if train_shared and p.numel()]
    groups = [("slow", slow, cfg.lr * cfg.slow_lr_ratio),
              ("fast", [model.tasks[t].fast for t in tasks], cfg.lr),
              ("gate", [model.tasks[t].gate for t in tasks], cfg.lr * cfg.gate_lr_ratio)]
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


@dataclass
class TrainResult:
    steps: int  # steps completed (cfg.steps)
    resumed_from: int  # step the run resumed from (0: fresh)
    final_loss: float  # mean loss of the last min(20, steps) logged steps
    seconds_per_step: float  # median wall time of this process's steps
    ranks_agree: bool  # every rank ended with bit-identical adapter tensors
    history: list[float] = field(default_factory=list)  # loss of each step run by this process


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
        save_checkpoint(run_dir, step, model, optimizer, states, cfg.to_dict())
    barrier(runtime)


def train(cfg: TrainConfig, model: TaloraModel, tasks: list[EncodedTask], optimizer, runtime: Runtime,
          run_dir: Path, eval_fn=None) -> TrainResult:
    """Optimise ``model`` on ``tasks`` for ``cfg.steps`` steps; see the module docstring."""
    run_dir = Path(run_dir)
    log = JsonlLog(run_dir / LOG_FILE, enabled=runtime.is_main)
    sampler = MixedTaskSampler([len(t.examples) for t in tasks], cfg.sampling, cfg.sampling_temperature,
                               seed=cfg.seed * 1_000_003 + 7919 * (runtime.rank + 1))
    start = _resume(cfg, run_dir, model, optimizer, sampler, runtime, log)
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    gates = [p for g in optimizer.param_groups if g["name"] == "gate" for p in g["params"]]
    step_fn = _wrap(AnswerLoss(model), runtime)
    evaluate = _Evaluator(eval_fn, log, runtime)
    history, durations = [], []
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
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
        optimizer.step()
        durations.append(time.perf_counter() - tic)
        done = step + 1
        loss_value = all_mean(float(loss.detach()), runtime)
        history.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if done % cfg.log_every == 0 or done == cfg.steps:
            gate_open = float(torch.stack([torch.tanh(g.detach()).abs().mean() for g in gates]).mean()) if gates else 0.0
            log.write({"kind": "step", "step": done, "loss": loss_value, "lr": cfg.lr * factor,
                       "gate_abs_tanh": gate_open, "seconds": durations[-1],
                       "answer_tokens": int(batch.target_ids.numel()), "tasks": sorted({n for n, _ in items})})
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
            evaluate(done)
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.steps:
            _checkpoint(cfg, run_dir, done, model, optimizer, sampler, runtime)
    bar.close()
    digests = gather_objects(state_digest(model), runtime)
    tail = history[-20:] if history else [float("nan")]
    median = sorted(durations)[len(durations) // 2] if durations else float("nan")
    return TrainResult(cfg.steps, start, sum(tail) / len(tail), median, len(set(digests)) == 1, history)

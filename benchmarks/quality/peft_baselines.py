"""The PEFT baselines of the quality benchmark: PromptTuning, MultitaskPromptTuning and LoRA.

Each uses the real ``peft`` library on the Hugging Face copy of the same frozen checkpoint that
talora loads (``talora.adapters.loading.default_model_dir``), the same encoded examples
(``talora.adapters.train.data.encode_task``, same template, truncation and answer tokens), the
same batch draws (``MixedTaskSampler`` with the trainer's seed formula and class balance), the
same loss (mean cross-entropy over the answer tokens) and the same budget and optimiser settings
as the TA-LoRA stage (steps, batch, warm-up and schedule of ``talora.adapters.train.trainer.
lr_factor``, AdamW without weight decay, the same gradient clipping), each method at its own
learning rate. On a bfloat16 model the trained tensors are kept in float32 (as TA-LoRA's).
Rows are left-padded, so the answer tokens
end every row and only their logits are computed (``logits_to_keep``); PEFT prompt learning
ignores ``position_ids``, so its positions run over the padding as in any PEFT batch.

Evaluation is rank classification by label log-likelihood on the same test subset as TA-LoRA.
"""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness.setups import pad_left
from talora.adapters.model.precision import FloatMatmul, float_matmul_needed
from talora.adapters.runtime.scoring import plan_labels
from talora.adapters.train.data import EncodedTask, MixedTaskSampler
from talora.adapters.train.metrics import accuracy, macro_f1, majority_rate


@dataclass(frozen=True)
class Budget:
    """The training budget of a PEFT run: the TA-LoRA stage's fields (``plan.BUDGET``)."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    grad_clip: float = 1.0
    sampling_temperature: float = 2.0
    class_balance: str = "none"

    @classmethod
    def from_spec(cls, budget: dict, lr: float) -> Budget:
        names = ("steps", "batch_size", "warmup_steps", "lr_schedule", "grad_clip", "sampling_temperature",
                 "class_balance")
        return cls(lr=lr, **{n: budget[n] for n in names if n in budget})


def model_dir(name: str) -> Path:
    from talora.adapters.model.loading import DEFAULT_MODEL, default_model_dir

    return default_model_dir() if name in ("", "default", DEFAULT_MODEL) else Path(name)


def load_base(name: str, dtype: str = "float32"):
    """The frozen Hugging Face model and tokenizer (``dtype``, CPU or the first GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(folder)


# ----- PEFT models -----------------------------------------------------------------------------
def _sampled_vocab_rows(base, rows: int, generator: torch.Generator) -> torch.Tensor:
    emb = base.get_input_embeddings().weight
    ids = torch.randint(0, emb.shape[0], (rows,), generator=generator)
    return emb[ids.to(emb.device)].detach().clone().float()


def build_prompt_tuning(base, hyper: dict, seed: int):
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    torch.manual_seed(seed)  # SAMPLE_VOCAB draws from the global generator
    cfg = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hyper["num_virtual_tokens"],
                             prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB)
    return _float32_prompt(get_peft_model(base, cfg))


def _float32_prompt(model):
    """Keep the trained prompt encoder in float32 (PEFT casts prompts to the input dtype)."""
    model.prompt_encoder.float()
    return model


def build_mpt(base, hyper: dict, seed: int, num_tasks: int, source_file: Path | None):
    """MultitaskPromptTuning. Source: shared prompt from sampled vocabulary rows and every task's
    rank-``r`` factor set to ones, so each task's prompt starts as the shared prompt (PEFT's own
    RANDOM init starts the Hadamard product near zero, i.e. a near-zero prompt). Target: PEFT's
    AVERAGE_SOURCE_TASKS init from the source file; PEFT then trains all of it."""
    from peft import MultitaskPromptTuningConfig, MultitaskPromptTuningInit, TaskType, get_peft_model

    torch.manual_seed(seed)
    common = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=hyper["num_virtual_tokens"],
                  num_ranks=hyper["num_ranks"], num_tasks=num_tasks)
    if source_file is None:
        model = get_peft_model(base, MultitaskPromptTuningConfig(
            prompt_tuning_init=MultitaskPromptTuningInit.RANDOM, **common))
        encoder: Any = model.prompt_encoder["default"]  # a PEFT MultitaskPromptEmbedding
        with torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            encoder.embedding.weight.copy_(_sampled_vocab_rows(base, hyper["num_virtual_tokens"], gen))
            encoder.prefix_task_cols.fill_(1.0)
            encoder.prefix_task_rows.fill_(1.0)
        return _float32_prompt(model)
    return _float32_prompt(get_peft_model(base, MultitaskPromptTuningConfig(
        prompt_tuning_init=MultitaskPromptTuningInit.AVERAGE_SOURCE_TASKS,
        prompt_tuning_init_state_dict_path=str(source_file), **common)))


def build_lora(base, hyper: dict, seed: int, source_file: Path | None):
    from peft import LoraConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    torch.manual_seed(seed)
    cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, r=hyper["r"], lora_alpha=hyper["alpha"],
                     target_modules=list(hyper["targets"]), lora_dropout=0.0)
    model = get_peft_model(base, cfg, autocast_adapter_dtype=True)  # LoRA weights in float32
    if source_file is not None:
        set_peft_model_state_dict(model, load_file(str(source_file)))
    return model


def save_source(model, method: str, path: Path) -> None:
    """Write the source stage's weights as PEFT reads them back (MPT init file, LoRA state)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if method == "mpt":
        enc = model.prompt_encoder["default"]
        state = {"prompt_embeddings": enc.embedding.weight, "prefix_task_cols": enc.prefix_task_cols,
                 "prefix_task_rows": enc.prefix_task_rows}
    else:
        state = get_peft_model_state_dict(model)
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(path)


def trainable_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----- batches, loss, scores ---------------------------------------------------------------
def _tail_logits(model, rows, task_ids, keep: int, pad_id: int, real_positions: bool) -> torch.Tensor:
    """Logits ``(B, keep, V)`` at the last ``keep`` positions of left-padded ``rows``."""
    device = next(model.parameters()).device
    ids, mask = pad_left(rows, pad_id, device)
    kwargs = {"input_ids": ids, "attention_mask": mask, "logits_to_keep": keep}
    if task_ids is not None:
        kwargs["task_ids"] = torch.tensor(task_ids, dtype=torch.long, device=device)
    if real_positions:  # LoRA and the bare model; prompt learning ignores position_ids (module doc)
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    half_cpu = float_matmul_needed(base.get_input_embeddings().weight.dtype, device)
    with FloatMatmul() if half_cpu else nullcontext():  # as CausalLM does
        return model(**kwargs).logits.float()


def answer_loss(model, items, pad_id: int, multitask_ids: bool, real_positions: bool) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of ``items`` = [(task index, EncodedExample)]."""
    rows = [ex.prompt_ids + ex.target_ids[:-1] for _, ex in items]
    keep = max(len(ex.target_ids) for _, ex in items)
    logits = _tail_logits(model, rows, [t for t, _ in items] if multitask_ids else None, keep, pad_id, real_positions)
    picked, targets = [], []
    for b, (_, ex) in enumerate(items):
        n = len(ex.target_ids)
        picked.append(logits[b, keep - n:])
        targets.extend(ex.target_ids)
    return F.cross_entropy(torch.cat(picked), torch.tensor(targets, device=logits.device))


@torch.no_grad()
def predict_labels(model, task: EncodedTask, task_id: int | None, pad_id: int, real_positions: bool,
                   batch_size: int = 16) -> list[str]:
    """Argmax over labels of the summed log-likelihood of each label's verbaliser tokens.

    The rows and terms are ``talora.adapters.scoring.plan_labels``'s, as TA-LoRA scores them; the
    rows are left-padded, so read ``r`` of a row of length ``n`` is tail column ``keep - n + r``.
    """
    keep = max(len(v) for v in task.label_ids)
    preds = []
    for start in range(0, len(task.examples), batch_size):
        plans = [plan_labels(ex.prompt_ids, task.label_ids) for ex in task.examples[start:start + batch_size]]
        rows = [list(row) for plan in plans for row in plan.rows]
        ids = None if task_id is None else [task_id] * len(rows)
        logp = torch.log_softmax(_tail_logits(model, rows, ids, keep, pad_id, real_positions), dim=-1)
        base = 0
        for plan in plans:
            scores = torch.zeros(plan.num_labels, dtype=logp.dtype, device=logp.device)
            for row, read, target, label in plan.terms:
                scores[label] += logp[base + row, keep - len(rows[base + row]) + plan.first_read + read, target]
            preds.append(task.labels[int(scores.argmax())])
            base += len(plan.rows)
    return preds


def evaluate(model, task: EncodedTask, task_id: int | None, pad_id: int, real_positions: bool) -> dict:
    """Metrics as ``talora.adapters.train.evaluate.evaluate_task`` gives them, predictions included."""
    model.eval()
    gold = [ex.label for ex in task.examples]
    pred = predict_labels(model, task, task_id, pad_id, real_positions)
    return {"examples": len(gold), "accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred, task.labels),
            "majority_rate": majority_rate(gold), "predictions": [task.labels.index(p) for p in pred]}


# ----- training ----------------------------------------------------------------------------
def train(model, tasks: list[EncodedTask], budget: Budget, seed: int, pad_id: int, multitask_ids: bool,
          real_positions: bool, progress: bool = True) -> dict:
    """``budget.steps`` AdamW steps on mixed batches of ``tasks``; returns losses and the median step time."""
    from tqdm.auto import tqdm

    from talora.adapters.train.data import label_groups
    from talora.adapters.train.trainer import lr_factor

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=budget.lr, weight_decay=0.0)
    groups = [label_groups(t) for t in tasks] if budget.class_balance == "sampler" else None
    # the trainer's seed formula (talora.adapters.train.trainer.train), so both draw the same batches
    sampler = MixedTaskSampler([len(t.examples) for t in tasks], "temperature", budget.sampling_temperature,
                               seed=seed * 1_000_003 + 7919, label_groups=groups)
    losses, durations = [], []
    model.train()
    for step in tqdm(range(budget.steps), desc="peft steps", disable=not progress, leave=False):
        tic = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = budget.lr * lr_factor(step, budget)  # type: ignore[arg-type]  # the same schedule fields
        items = [(t, tasks[t].examples[i]) for t, i in sampler.draw(budget.batch_size)]
        optimizer.zero_grad(set_to_none=True)
        loss = answer_loss(model, items, pad_id, multitask_ids, real_positions)
        loss.backward()
        if budget.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, budget.grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        durations.append(time.perf_counter() - tic)
    tail = losses[-20:]
    return {"final_loss": sum(tail) / len(tail), "seconds_per_step": sorted(durations)[len(durations) // 2],
            "losses": losses}

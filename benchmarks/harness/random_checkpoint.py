"""A random-weight checkpoint folder in one of ``engine_overhead.SHAPES``, for a server run with no download.

    python -m benchmarks.harness.random_checkpoint qwen05b-random /tmp/qwen05b-random --dtype bfloat16

Writes what ``talora-serve --model DIR`` reads: ``config.json`` (transformers' config of the shape's
family), ``model.safetensors`` (seeded random weights, the head tied where the shape ties it) and the
byte-level tokenizer of ``engine_overhead.byte_tokenizer`` (every byte a token, ``<eos>`` 256). Used by
the GPU scripts' HTTP stage, where the machine cannot download a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from benchmarks.serving.engine_overhead import SHAPES, byte_tokenizer

EOS = 256  # the byte tokenizer's <eos>


def hf_config(shape: dict) -> dict:
    """transformers' ``config.json`` fields for a ``SHAPES`` entry."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        shape["model_type"], vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
        head_dim=shape["head_dim"], rope_theta=shape["rope_theta"], rms_norm_eps=shape["rms_norm_eps"],
        tie_word_embeddings=shape["tie_word_embeddings"], max_position_embeddings=4096,
        bos_token_id=EOS, eos_token_id=EOS, torch_dtype="float32")
    return config.to_dict()


def write_random_checkpoint(name: str, folder: Path, dtype: str = "float32", seed: int = 0, **overrides) -> Path:
    """Seeded random weights of shape ``name`` (``SHAPES``, then ``overrides`` of its fields) as a
    checkpoint folder at ``folder``."""
    from talora.adapters.model.config import ModelConfig
    from talora.adapters.model.frozen_lm import CausalLM

    if name not in SHAPES:
        raise ValueError(f"shape: {name!r} is not one of {sorted(SHAPES)}")
    config = hf_config({**SHAPES[name], **overrides})
    cfg = ModelConfig.from_hf(config)
    torch.manual_seed(seed)
    with torch.no_grad():
        lm = CausalLM(cfg).to(getattr(torch, dtype))
    state = {k: v.detach().contiguous() for k, v in lm.state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype}, indent=2, default=str))
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    byte_tokenizer().save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shape", choices=sorted(SHAPES), help="the model shape")
    p.add_argument("folder", type=Path, help="where to write the checkpoint")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args(argv)
    print(write_random_checkpoint(args.shape, args.folder, args.dtype, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

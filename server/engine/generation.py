"""Token sampling on the device and incremental detokenisation with stop strings, for the engine's decode steps.

``RowSampler`` picks the next token of every generation of a step where its logits are, on the
device: greedy at temperature 0, otherwise temperature, top-k and nucleus (top-p) sampling by an
**exponential race** whose noise is a counter-based hash of (the request's seed, the token's
position in the generation, the token id): ``argmax_i (log w_i - log E_i)`` with
``E_i = -log u_i`` picks token i with probability ``w_i / sum w`` (``w`` the kept weights).
Only the chosen ids cross to the host. The draws of a row depend on nothing but its seed, its
step and the vocabulary: not on the batch it runs in, the other rows, or any generator state,
so a step needs no host random numbers and could be captured in a CUDA graph.

Reproducibility contract: the same seed, prompt, parameters, model weights and dtype give the
same tokens on the same device type. Across device types (CPU vs CUDA) the hash gives the same
noise bit for bit, but the logits differ in their last bits, so a near tie may go either way.

``sample_token`` is the same sampler for one row of logits (tests and offline use). ``TextStream``
turns the generated ids into text deltas, decoding a short window of the last ids per token: it
holds back an incomplete UTF-8 character and any tail that could still become a stop string, so a
streamed client never sees text that is later withdrawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


class BadLogits(ValueError):
    """A row of logits holds NaN or no finite value: the model's output, not the request, is broken."""


def _mul32(x, c: int):
    """``(x * c) mod 2**32`` for 32-bit ``x`` (int or int64 tensor), never past 2**63 in between."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x):
    """A bijection of 32-bit words with full avalanche (Wellons' ``lowbias32``); ints or int64 tensors."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def row_key(seed: int, step: int) -> int:
    """32-bit key of the draws for token ``step`` (0-based) of a generation seeded with ``seed`` (< 2**64)."""
    seed_key = mix32((seed & _MASK32) ^ mix32(((seed >> 32) & _MASK32) ^ 0x9E3779B9))
    return mix32(seed_key ^ mix32(step & _MASK32))


def race_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """``log E`` (float64, ``(R, vocab)``) with ``E ~ Exp(1)`` drawn by hashing (key, token id), ``keys
    (R, 1)`` int64 in [0, 2**32). The uniform is ``(h + 0.5) / 2**32``: never 0 or 1."""
    token = torch.arange(vocab, device=keys.device, dtype=torch.int64)[None, :]
    h = mix32(mix32(token ^ keys) ^ mix32(keys ^ 0x85EBCA6B))
    uniform = (h.double() + 0.5) * 2.0 ** -32
    return torch.log(-torch.log(uniform))


def sample_rows(logprobs: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
                keys: torch.Tensor, candidates: int | None = None) -> torch.Tensor:
    """Next token ids ``(R,)`` int64 of ``logprobs (R, V)`` rows (any float dtype, any device).

    ``temperature (R, 1)`` float64 > 0, ``top_p (R, 1)`` float64 in (0, 1], ``top_k (R, 1)`` int64
    (0: no limit), ``keys (R, 1)`` int64 from ``row_key``. Works in float64 on logits shifted so the
    best is 0: weight 1 after any temperature, never all zeros or NaN. Top-k and the nucleus keep
    the best token and every token at least as likely as the last one they keep, so ties go together
    and the set never depends on the order a sort leaves them in. ``candidates`` (the host's: nothing
    waits on the device): the largest ``top_k`` when every row with ``top_p < 1`` has one (a
    ``topk``), None for all (a sort), 0 when no row has ``top_p < 1`` or ``top_k > 0``.
    """
    logits = logprobs.double()
    best = logits.max(-1, keepdim=True).values
    scaled = torch.where(logits == best, 0.0, (logits - best) / temperature)  # log weights, best 0
    score = scaled - race_noise(keys, logits.shape[-1])
    if candidates == 0:
        return score.argmax(-1)
    weights = torch.exp(scaled)
    count = weights.shape[-1] if candidates is None else min(candidates, weights.shape[-1])
    top = weights.topk(count, -1).values  # sorted, largest first
    within_k = torch.arange(count, device=weights.device)[None, :] < torch.where(top_k > 0, top_k, count)
    kept = ((top.cumsum(-1) - top) / weights.sum(-1, keepdim=True) < top_p) & within_k  # a prefix of top
    cut = top.gather(-1, kept.sum(-1, keepdim=True).clamp(min=1) - 1)  # the smallest weight kept (NaN rows: any)
    chosen = torch.where(weights >= cut, score, float("-inf")).argmax(-1)
    return torch.where((top_k[:, 0] > 0) | (top_p[:, 0] < 1), chosen, score.argmax(-1))


@dataclass(frozen=True)
class SamplingRow:
    """One generation's sampling parameters for this step."""

    read: int  # index among the step's sample reads
    temperature: float  # > 0 (greedy rows are not sampled)
    top_p: float
    top_k: int  # 0: no limit
    seed: int
    step: int  # tokens generated so far


def _to_device(values: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``values`` as a tensor on ``device``; to CUDA through pinned memory without blocking (a plain
    copy would wait for every step queued before it)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else host


class RowSampler:
    """Picks the next token of every sample read of a step on the device: ``__call__(logprobs (D, V))``
    returns ``(D,)`` int64 ids, the argmax for reads not in ``rows`` (temperature 0)."""

    def __init__(self, rows: Sequence[SamplingRow], device: torch.device | str):
        self.reads = _to_device([r.read for r in rows], torch.int64, device)
        floats = _to_device([[r.temperature, r.top_p] for r in rows], torch.float64, device).view(-1, 2)
        ints = _to_device([[r.top_k, row_key(r.seed, r.step)] for r in rows], torch.int64, device).view(-1, 2)
        self.temperature, self.top_p = floats[:, :1], floats[:, 1:]
        self.top_k, self.keys = ints[:, :1], ints[:, 1:]
        cut = [r for r in rows if r.top_p < 1 or r.top_k > 0]
        self.candidates = 0 if not cut else None if any(r.top_k <= 0 for r in cut) else max(r.top_k for r in cut)

    def __call__(self, logprobs: torch.Tensor) -> torch.Tensor:
        tokens = logprobs.argmax(-1)
        if len(self.reads):
            tokens[self.reads] = sample_rows(logprobs[self.reads], self.temperature, self.top_p, self.top_k,
                                             self.keys, self.candidates)
        return tokens


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, seed: int | torch.Generator,
                 step: int = 0, top_k: int = 0) -> int:
    """Next token id from ``logits (V,)``, for any ``temperature >= 0``, ``top_p`` in (0, 1] and
    ``top_k >= 0``: ``RowSampler``'s choice for one row (a generator stands for its initial seed).
    Raises ``BadLogits`` when the row has a NaN or no finite entry."""
    if torch.isnan(logits).any() or not torch.isfinite(torch.max(logits)):
        raise BadLogits("the model produced NaN or non-finite logits")
    if temperature == 0:
        return int(torch.argmax(logits))
    seed = seed.initial_seed() if isinstance(seed, torch.Generator) else seed
    sampler = RowSampler([SamplingRow(0, temperature, top_p, top_k, seed, step)], logits.device)
    return int(sampler(logits[None])[0])


class TextStream:
    """Generated ids -> text, cut at the first stop string. Each token decodes a window, as vLLM's
    incremental detokeniser does: ids ``_prefix:`` less the text of ids ``_prefix:_read``, after the
    first ``_settled`` characters. Text ending in an incomplete UTF-8 character (U+FFFD) does not
    settle, so windows start on a character. A tokenizer without a fast backend, with a clean-up
    across tokens, or whose window disagrees with its decode so far decodes every id."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""  # the decode of ``ids``, cut at a stop string
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False
        cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)  # joins text across tokens
        self._windowed = getattr(tokenizer, "is_fast", False) and not cleans_up
        self._prefix, self._read, self._prefix_text, self._settled = 0, 0, "", 0

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that is now safe to hand out."""
        self.ids.append(token_id)
        window = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if not window.startswith(self._prefix_text):  # not a local decoder after all
            self._windowed, self._prefix, self._read, self._prefix_text, self._settled = False, 0, 0, "", 0
            return self.push(self.ids.pop())
        new = window[len(self._prefix_text):]
        self.text = self.text[:self._settled] + new
        longest = max(map(len, self.stop), default=0)  # a stop string ending in settled text was found before
        hits = [i for i in (self.text.find(s, max(0, self._settled - longest)) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
            return self._take(len(self.text))
        safe = self._settled + len(new.rstrip("\ufffd"))  # the settled text ends in a whole character
        if self._windowed and new and safe == len(self.text):
            self._prefix, self._read, self._settled = self._read, len(self.ids), safe
            self._prefix_text = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        return self._take(safe - self._stop_prefix_len(safe))

    def finish(self) -> str:
        """Everything not yet handed out, at the end of the generation."""
        return self._take(len(self.text))

    def _stop_prefix_len(self, end: int) -> int:
        """Length of the longest tail of ``text[:end]`` that begins some stop string."""
        return max((k for s in self.stop for k in range(1, min(len(s), end + 1)) if self.text.endswith(s[:k], 0, end)),
                   default=0)

    def _take(self, upto: int) -> str:
        delta, self.emitted = self.text[self.emitted:upto], max(upto, self.emitted)
        return delta

"""One step on the cached path, and greedy decoding built from it.

``run_step`` runs one packed ``forward_cached`` (``talora.adapters.runtime.batching``) and reads what the
step asks for on the device: the summed label log-probabilities of every score group, and for
every row that picks a next token its choice (greedy, or the caller's ``sampler`` run on the
device) and whether its logits are usable. Only those few numbers cross to the host, in one
copy. The server's engine and training evaluation (``greedy_generate``) both decode through it.

``launch_step`` is the same step without the wait: it returns ``StepReads``, whose picks stay on
the device (the next step can feed them to its decode rows, ``StepPlan.add_fed_decode_row``) while
their copy to the host runs; ``StepReads.result()`` waits for it. On a CPU every op has finished
when it returns, so the two are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from talora.adapters.model.talora_model import KVCache, PrefixKV, SlotKV, TaloraModel
from talora.adapters.runtime.batching import PackedStep, Row, StepBuffers, StepPlan, feed_picks


@dataclass
class StepOutputs:
    """What one step hands back to the host."""

    scores: torch.Tensor  # (G,) float32, host: summed label log-probabilities of each score group
    next_tokens: list[int]  # (D,) next token of each sample read (argmax, or the sampler's pick)
    usable: list[bool]  # (D,) the read's logits hold no NaN and some finite value


class StepReads:
    """One step's reads on the device, on their way to the host.

    ``tokens`` (D,) int64 stays on the device (a later step may feed it to its decode rows);
    the scores, the tokens and their usability are copied to the host in one transfer, without
    blocking on CUDA (pinned memory and an event); ``result()`` waits for that copy.
    """

    def __init__(self, scores: torch.Tensor, picked: torch.Tensor,
                 sampler: Callable[[torch.Tensor], torch.Tensor] | None = None):
        # log-probabilities hold no +inf: a row's maximum is finite exactly when it has a finite value
        # and no NaN (max propagates NaN); greedy takes the argmax from the same pass
        if sampler is None:
            best, self.tokens = picked.max(-1)
        else:
            best, self.tokens = picked.amax(-1), sampler(picked)
        usable = torch.isfinite(best)
        small = torch.cat([scores, self.tokens.float(), usable.float()])  # token ids < 2**24 are exact
        self.groups, self.picks = len(scores), len(picked)
        self._copied: torch.cuda.Event | None = None
        if small.is_cuda:
            self._host = torch.empty(small.shape, dtype=small.dtype, pin_memory=True)
            self._host.copy_(small, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record()
        else:
            self._host = small.cpu()

    def result(self) -> StepOutputs:
        """The host's copy (waits for the device to reach it)."""
        if self._copied is not None:
            self._copied.synchronize()
        small, groups, picks = self._host, self.groups, self.picks
        return StepOutputs(small[:groups], [int(t) for t in small[groups:groups + picks].tolist()],
                           [bool(u) for u in small[groups + picks:].tolist()])


def read_logprobs(model: TaloraModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head and log-softmax of a step (eager and CUDA graphs): hidden ``(R, d)`` -> ``(R, V)`` float32."""
    return torch.log_softmax(model.lm.logits(hidden).float(), dim=-1)  # not logsumexp: ~6x faster on CPU


@torch.no_grad()
def launch_step(model: TaloraModel, step: PackedStep, prefix: PrefixKV, slots: SlotKV, cache: KVCache | None = None,
                sampler: Callable[[torch.Tensor], torch.Tensor] | None = None,
                previous: torch.Tensor | None = None) -> StepReads:
    """Forward ``step`` and start reading it on the device. ``sampler`` maps the sample reads'
    log-probabilities ``(D, V)`` float32 to their next tokens ``(D,)`` on the device; None: the argmax
    (greedy). ``previous``: the step before's ``StepReads.tokens``, which ``step``'s fed rows read."""
    feed_picks(step.input_ids, step.fed_at, step.fed_from, previous)
    hidden = model.forward_cached(step.input_ids, step.meta, prefix, slots, cache)
    logprobs = read_logprobs(model, hidden[step.read_index])  # (R, V)
    scores = torch.zeros(step.num_groups, dtype=torch.float32, device=logprobs.device)
    scores.index_add_(0, step.term_groups, logprobs[step.term_reads, step.term_targets])
    return StepReads(scores, logprobs[step.sample_reads], sampler)


def run_step(model: TaloraModel, step: PackedStep, prefix: PrefixKV, slots: SlotKV, cache: KVCache | None = None,
             sampler: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepOutputs:
    """``launch_step`` and wait for its reads."""
    return launch_step(model, step, prefix, slots, cache, sampler).result()


@torch.no_grad()
def greedy_generate(model: TaloraModel, prefix: PrefixKV, slots: SlotKV, prompts: list[list[int]],
                    slot_ids: list[int], max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuation of each prompt (stop tokens excluded) on the cached path."""
    mc, device = model.lm.config, model.lm.device
    capacity = max(len(p) for p in prompts) + max_new_tokens
    cache = KVCache(mc.num_layers, capacity * len(prompts), mc.num_kv_heads, mc.head_dim, model.lm.dtype, device)
    buffers = StepBuffers.make(device, sum(len(p) for p in prompts), len(prompts))
    tokens = [list(p) for p in prompts]
    plan = StepPlan()
    for i, prompt in enumerate(prompts):
        plan.add_row(Row(prompt, 0, i * capacity, slot_ids[i], len(prompt) - 1), sample=True)
    live = list(range(len(prompts)))
    for _ in range(max_new_tokens):
        out = run_step(model, buffers.prepare(plan), prefix, slots, cache)
        kept = [(i, token) for i, token in zip(live, out.next_tokens) if token not in stop_ids]
        for i, token in kept:
            tokens[i].append(token)
        live, plan = [i for i, _ in kept], StepPlan()
        for i in live:
            plan.add_decode_row(tokens[i], i * capacity, slot_ids[i])
        if not live:
            break
    return [t[len(p):] for t, p in zip(tokens, prompts)]

"""talora.kernels: the two custom ops of TA-LoRA serving, with PyTorch reference twins.

``lowrank_prompt`` writes per-row task prompts ``scale * B[slot] @ A`` into a packed buffer;
``gated_prefix_attention`` is the mixed-task two-softmax attention over the shared prompt, the
row's own causal keys and the row's task slot. ``dispatch`` picks Triton or the reference.
"""

from talora.kernels.dispatch import gated_prefix_attention, get_backend, kernel_backend, lowrank_prompt

__all__ = ["gated_prefix_attention", "lowrank_prompt", "kernel_backend", "get_backend"]

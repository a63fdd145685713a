"""Quality benchmarks: TA-LoRA's accuracy against PEFT baselines (``python -m benchmarks.quality``), the
recipe's checks on small and imbalanced tasks, the user-task suite and the training dtype. Stored runs,
source-stage weights and summaries land in ``benchmarks/results/quality/``; ``notes.md`` is the history."""

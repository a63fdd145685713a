"""Tests of talora.adapters: the model, the TA-LoRA parametrisation, files, tasks and training."""

"""Tests of talora.adapters.model: the frozen LM, loading, the TA-LoRA parametrisation, precision."""

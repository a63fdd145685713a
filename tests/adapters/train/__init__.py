"""Tests of talora.adapters.train: source and target training, evaluation, the talora-train CLI."""

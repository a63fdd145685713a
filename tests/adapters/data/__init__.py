"""Tests of talora.adapters.data: task specs, splits, sources and user file tasks."""

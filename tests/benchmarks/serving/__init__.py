"""Tests of benchmarks.serving: summaries, ratios and smoke runs at tiny sizes."""

"""Tests of the benchmark harness (bookkeeping only; no benchmark is timed here)."""

"""Tests of the benchmarks, one folder per suite as in benchmarks/ (bookkeeping and smoke runs; no
benchmark is timed here)."""

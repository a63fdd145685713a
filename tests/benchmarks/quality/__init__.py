"""Tests of benchmarks.quality: plan, keys, stored runs, source builds, claims, statistics, the suites."""

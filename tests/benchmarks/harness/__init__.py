"""Tests of benchmarks.harness: the request set, task popularity, the summary JSON, plots."""

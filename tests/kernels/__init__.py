"""Tests of talora.kernels: reference twins against float64 oracles, Triton against the reference."""

"""Tests of benchmarks.kernels: the decode measurements at tiny sizes on CPU."""

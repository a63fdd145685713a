"""Serving benchmarks: throughput, latency and memory of the engine and the HTTP server, against the
bare model, PEFT, vLLM and Hugging Face ``generate``. Results land in ``benchmarks/results/serving/``."""

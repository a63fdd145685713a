"""The benchmarks: reproducible scripts run from the repository root as ``python -m benchmarks.<name>``.

The shared harness is ``bench_args`` (flags), ``bench_report`` (machine info, timing, JSON/JSONL
writers), ``bench_requests`` (the request set), ``bench_bundle`` (random adapter bundles) and
``bench_setups`` (the measured setups). ``vllm_worker`` is the exception: it runs by path in the
vLLM venv and imports nothing from here. Results land in ``benchmarks/results/`` (docs/benchmarks.md).
"""

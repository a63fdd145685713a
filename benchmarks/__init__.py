"""The benchmarks: reproducible scripts run from the repository root as ``python -m benchmarks.<suite>.<name>``.

Four subpackages (benchmarks/README.md): ``harness`` (what the suites share: flags, reports, the
request set, random bundles, the measured setups, the results folders), ``serving``, ``kernels``
and ``quality`` (``python -m benchmarks.quality``). Each suite's results land in
``benchmarks/results/<suite>/``. ``vllm_worker`` is the exception: it runs by path in the vLLM venv
and imports nothing from here.
"""

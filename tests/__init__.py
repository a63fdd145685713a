"""The test suite; its folders mirror the code (kernels, adapters, server, benchmarks)."""

"""Kernel benchmarks: the Triton attention kernels against their reference twins, the decode kernel's
share of HBM bandwidth, the CPU half-precision matmul path, and the ``gpu_*.sh`` device scripts that
run them on a CUDA machine. Results land in ``benchmarks/results/kernels/``."""

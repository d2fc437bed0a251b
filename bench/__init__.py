"""Kernel benchmarks of cepo_kernels against peers: run with `pytest bench/` (see README.md)."""

"""Benchmarks: each prints a table; none asserts a time (machines are shared and noisy)."""

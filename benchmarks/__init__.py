"""Benchmarks: run them as scripts, e.g. ``python benchmarks/throughput.py``."""

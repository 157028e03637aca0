"""Benchmark drivers behind ``scripts/benchmark.py``; each writes its section of docs/BENCHMARKS.md."""

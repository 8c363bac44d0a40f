"""Benchmarks.  ``speed``: optimizer step-time microbenchmark."""

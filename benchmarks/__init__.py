"""Benchmarks of nightbatch's data stages (not timed tests; CI runs them at a tiny size)."""

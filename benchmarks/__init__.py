"""Benchmarks run by ``make bench-*``: measurements for people, not tests (nothing here asserts)."""

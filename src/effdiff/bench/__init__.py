"""Benchmark runner, results store and report."""

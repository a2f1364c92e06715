"""Benchmarks of tbss-queue against its peers (run by hand: python -m benchmarks.run)."""

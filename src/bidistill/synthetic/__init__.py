"""Synthetic cohorts that anyone can make offline: for tests, demos and benchmarks."""

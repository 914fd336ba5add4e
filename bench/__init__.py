"""Benchmarks behind `knet bench ...`: each prints a table, writes JSON, and compares
alternatives side by side in one run (ratios), because shared machines are noisy."""

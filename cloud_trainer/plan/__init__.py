"""Partition planning from measurements (Scission), for chains of nodes (DEFER).

``network`` reads ``network.toml`` (nodes, links, constraints); ``costs`` turns benchmark
records and the network into per-block / per-boundary costs; ``solver`` finds the exact best
plans by dynamic programming; ``report`` prints, plots and writes per-node manifests;
``store`` keeps the records devices publish; ``localbench`` benchmarks a zoo model here.
"""

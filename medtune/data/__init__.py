"""Datasets: sources -> format registry -> prepare (records, rendering checks, split, stats)."""

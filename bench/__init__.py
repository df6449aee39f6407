"""Benchmarks (installed as turbokernels.bench; `turbokernels bench <name>` or `python bench/<name>.py`).

Each benchmark measures its baseline in the same run, reports medians, ratios and % of a roofline measured on the
same machine, and writes a CSV plus a plot. Speed goals live here, never in timed tests.
"""

"""Measuring memory on a device (probes, the counting CPU allocator, the dispatch tracker, per-step aggregation).

No Lightning is imported here.
"""

"""Measured comparisons (not tests): ``python -m benchmarks`` (``make bench``)."""

"""Data layer: readers turn any supported on-disk layout into one table; the cache stores decoded crops."""

"""Pure helpers with no network and no knowledge of datasets: geometry, boxes, statistics and
their kernels, progress, atomic writes, locks, digests, strict number parsing.

The lowest floor: modules here import only ``emdata.errors`` and each other.
"""

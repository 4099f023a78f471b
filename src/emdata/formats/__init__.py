"""Bytes to ``RawVolume``: one reader per file format, no network."""

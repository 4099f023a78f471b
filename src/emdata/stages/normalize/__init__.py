"""normalize: one source volume or collection into the canonical HDF5."""

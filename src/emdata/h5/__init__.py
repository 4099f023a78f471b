"""The product format, shared by the writer (stages) and the reader (access): HDF5 layout,
chunking, the chunk index, the collection layout and the metadata record."""

"""Block-wise access to the canonical HDF5 for training and inference.

- :mod:`.volume`: ``open_dataset`` and ``Volume`` (voxel slicing, nm ROIs, dask/xarray views);
- :mod:`.blocks`: exact block coverings with halo and a border policy;
- :mod:`.sampling`: seeded random patches (label-aware, feasibility checked up front), grids;
- :mod:`.tiling`: tiled inference with blending, resumable from a ledger;
- :mod:`.torch`: a PyTorch ``Dataset`` adapter (optional extra ``torch``).
"""

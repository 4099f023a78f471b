"""Block-wise access to the canonical HDF5 for training and inference.

- :mod:`.open`: ``open_dataset`` (a name, path or version to a Volume); :mod:`.versions`: DVC;
- :mod:`.volume`: ``Volume`` (voxel slicing, padded reads, nm ROIs, dask/xarray views), reading
  through a storage (:mod:`.storage`): the local file (:mod:`.local`) or a DVC remote (:mod:`.remote`);
- :mod:`.blocks`: exact block coverings with halo and a border policy; :mod:`.padding`;
- :mod:`.sampling`: seeded random patches (label-aware, feasibility checked up front), grids;
- :mod:`.tiling`: tiled inference with blending, resumable from a ledger; :mod:`.predict`
  (one block) and :mod:`.cluster` (on Dask workers);
- :mod:`.collection`: collections of 2D images and aligned patch pairs;
- :mod:`.torch`: a PyTorch ``Dataset`` adapter (optional extra ``torch``).
"""

"""``open_collection`` and ``PairedPatches``: read a collection's images, draw aligned patch pairs.

A collection (Light My Cells studies, organoid tracking wells) is one HDF5 of many images with a
table (docs/architecture.md, "collections")::

    col = emdata.open_collection("lightmycells_study_3")
    col.images                       # ["1", "2", ...], in the table's order
    col.table                        # one dict per image (modality, z planes, shape, targets, ...)
    col.paths("1")                   # ["inputs/BF_z0", ..., "targets/Mitochondria"]
    bf = col.open("1", "inputs/BF_z0")   # a Volume: 2D images are one Z plane, dims "YX"
    boxes = col.table_of("W_E4_12", "annotations/boxes")   # a well's boxes, as a structured array

``PairedPatches(col, inputs="BF", target="Mitochondria", patch_shape=(256, 256), seed=0)`` draws aligned
(input, target) patches only from images that have that target: patch ``i`` of epoch ``e`` comes
from ``numpy.random.default_rng([seed, e, i])`` (the image, with probability proportional to its
number of patch positions; one of its input planes; the position), so it is the same in any process
and with any number of DataLoader workers. What cannot be drawn fails at construction.

The file opens lazily once per process and is never pickled open (as :class:`~.volume.Volume`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emdata.access.deprecation import Alias, pick
from emdata.access.local import LocalStorage
from emdata.access.open import dataset_path
from emdata.access.sampling import Patch
from emdata.access.volume import Volume
from emdata.errors import AccessError, ConfigError, NotBuiltError
from emdata.h5 import hdf5
from emdata.h5.collection import TABLE, array_to_rows, image_arrays, is_collection


class Collection:
    """The images of one collection HDF5 (read-only, fork- and pickle-safe)."""

    def __init__(self, path: str | os.PathLike, *, name: str | None = None) -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.storage = LocalStorage(self.path, name=self.name)  # one open file per process, for every image
        with hdf5.open_read(self.path) as f:
            if not is_collection(f):
                raise NotBuiltError(f"{self.path} is not a collection (it holds one volume); use emdata.open_dataset")
            self.table: list[dict[str, Any]] = array_to_rows(f[TABLE][()]) if TABLE in f else []
            self._arrays = image_arrays(f)
            self.shapes = {f"{image}/{p}": tuple(f[f"images/{image}/{p}"].shape)
                           for image, paths in self._arrays.items() for p in paths}
            self.attrs = hdf5.read_attrs(f)
        order = [str(row["image"]) for row in self.table]
        self.images: list[str] = order + sorted(set(self._arrays) - set(order))

    def __repr__(self) -> str:
        return f"Collection({self.name!r}, {len(self.images)} images)"

    def __len__(self) -> int:
        return len(self.images)

    def paths(self, image: str) -> list[str]:
        """The arrays of one image, relative to its group (``inputs/BF_z0``, ``targets/Actin``, ``raw``)."""
        if image not in self._arrays:
            raise AccessError(f"{self.name}: no image {image!r} ({len(self.images)} images, e.g. "
                              f"{', '.join(self.images[:5])})")
        return list(self._arrays[image])

    def open(self, image: str, path: str) -> Volume:
        """One array as a :class:`Volume` (a 2D image has shape (1, Y, X) and ``dims == "YX"``)."""
        if path not in self.paths(image):
            raise AccessError(f"{self.name}: image {image!r} has no {path!r} (it has {', '.join(self.paths(image))})")
        return Volume(self.storage, f"images/{image}/{path}", name=f"{self.name}:{image}/{path}")

    def table_of(self, image: str, name: str) -> np.ndarray | None:
        """A table stored with one image (e.g. ``annotations/boxes``), or None if it has none."""
        with hdf5.open_read(self.path) as f:
            dset = f.get(f"images/{image}/{name}")
            return None if dset is None else dset[()]

    # -- patch reads for samplers, through the one storage -------------------------------------

    def read(self, image: str, path: str, start: tuple[int, int], shape: tuple[int, int], *,
             frame: int = 0) -> np.ndarray:
        """A (Y, X) box ``[start, start + shape)`` of a 2D image (or of ``frame`` of a series), inside it."""
        array = f"images/{image}/{path}"
        stored = self.storage.describe(array, f"{self.name}:{image}/{path}").stored_shape
        y0, x0 = (int(v) for v in start)
        y1, x1 = y0 + int(shape[0]), x0 + int(shape[1])
        if not (0 <= y0 < y1 <= stored[-2] and 0 <= x0 < x1 <= stored[-1]):
            raise AccessError(f"{self.name}: box {y0}..{y1} x {x0}..{x1} is outside {image}/{path} {stored}")
        z = 0 if len(stored) == 2 else int(frame)
        return self.storage.read_box(array, (z, y0, x0), (z + 1, y1, x1))[0]

    def close(self) -> None:
        self.storage.close()

    def __enter__(self) -> "Collection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_collection(name: str | os.PathLike, *, rev: str | None = None, repo: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Collection:
    """Open ``data/processed/<name>.h5`` (or an HDF5 path) as a :class:`Collection`.

    ``name``, ``rev``, ``repo`` and ``cache_dir`` work as in :func:`emdata.open_dataset`.
    """
    path, label = dataset_path(name, rev=rev, repo=repo, cache_dir=cache_dir)
    return Collection(path, name=label)


@dataclass
class PairedPatch(Patch):
    """An aligned (input, target) pair: ``raw`` is the input patch, ``label`` the target patch, both (Y, X).

    ``origin`` is (z, y, x) as for every :class:`~emdata.access.sampling.Patch`: the first voxel in
    the image's Volume (``col.open(image, path)``, where a 2D image is one Z plane), so z is 0.
    (Before, it was (y, x).)
    """

    image: str = ""
    input: str = ""  # the input plane it came from, e.g. "inputs/BF_z2"


@dataclass(frozen=True)
class _Candidate:
    image: str
    inputs: tuple[str, ...]
    target: str
    shape: tuple[int, int]  # (y, x) of the image


class PairedPatches:
    """Seeded aligned patches of an input modality and a target, from the images that have both.

    Args:
        collection: a :class:`Collection` (``open_collection(name)``).
        inputs: input modality (``"BF"``, ``"PC"``, ``"DIC"``) or several; any of its z planes is drawn.
        target: target name (``"Mitochondria"``, ...): ``targets/<target>`` must exist in an image.
        patch_shape: patch (y, x) in pixels (``shape=`` is its deprecated name).
        seed: base seed; patch ``i`` of epoch ``e`` depends only on (seed, e, i).
        length: patches per epoch.
        z: only this focal plane (``inputs/<modality>_z<z>``); None draws among the image's planes.

    Raises:
        ConfigError: at construction, when no image has both the input and the target at least
            ``patch_shape`` large (the message says what the collection does have).
    """

    shape = Alias("patch_shape")  # the old name, deprecated

    def __init__(self, collection: Collection, inputs: str | tuple[str, ...] = "BF", target: str = "Mitochondria",
                 patch_shape: int | tuple[int, int] | None = None, *, seed: int = 0, length: int = 1000,
                 z: int | None = None, shape: int | tuple[int, int] | None = None) -> None:
        self.collection = collection
        self.modalities = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        self.target = target
        size = pick("PairedPatches", "shape", shape, "patch_shape", patch_shape, (256, 256))
        self.patch_shape: tuple[int, int] = ((int(size), int(size)) if isinstance(size, int)  # type: ignore[assignment]
                                             else tuple(int(v) for v in size))
        if len(self.patch_shape) != 2 or min(self.patch_shape) < 1:
            raise ConfigError(f"PairedPatches: patch_shape must be (y, x) positive integers, got {size!r}")
        self.seed, self.length, self.epoch = int(seed), int(length), 0
        self.z = z
        self.candidates = self._candidates()
        sizes = np.array([(c.shape[0] - self.patch_shape[0] + 1) * (c.shape[1] - self.patch_shape[1] + 1)
                          for c in self.candidates], np.float64)
        self._cdf = np.cumsum(sizes) / sizes.sum()

    def _candidates(self) -> list[_Candidate]:
        col = self.collection
        target = f"targets/{self.target}"
        with_target = too_small = no_input = 0
        out = []
        for image in col.images:
            paths = col.paths(image)
            if target not in paths:
                continue
            with_target += 1
            inputs = tuple(p for p in paths if p.startswith("inputs/") and p[7:].rsplit("_z", 1)[0] in self.modalities
                           and (self.z is None or p.endswith(f"_z{self.z}")))
            if not inputs:
                no_input += 1
                continue
            shape = col.shapes[f"{image}/{target}"][-2:]
            if any(col.shapes[f"{image}/{p}"][-2:] != shape for p in inputs):
                raise AccessError(f"{col.name}: image {image}: inputs and {target} differ in shape")
            if shape[0] < self.patch_shape[0] or shape[1] < self.patch_shape[1]:
                too_small += 1
                continue
            out.append(_Candidate(image, inputs, target, shape))
        if not out:
            plane = f" z{self.z}" if self.z is not None else ""
            have = sorted({p for image in col.images for p in col.paths(image) if p.startswith("targets/")})
            raise ConfigError(
                f"{col.name}: no image has both {'/'.join(self.modalities)}{plane} inputs and {target} at least "
                f"{self.patch_shape[0]} x {self.patch_shape[1]}: {with_target} of {len(col.images)} images have {target} "
                f"({no_input} without such inputs, {too_small} smaller than the patch); targets present: "
                f"{', '.join(t[8:] for t in have) or 'none'}")
        return out

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def locate(self, index: int, epoch: int | None = None) -> tuple[str, str, tuple[int, int, int]]:
        """Image, input plane and (z, y, x) origin of patch ``index`` (deterministic for seed, epoch, index)."""
        if not 0 <= index < self.length:
            raise AccessError(f"patch index {index} is outside 0..{self.length - 1}")
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch, index])
        drawn = min(int(np.searchsorted(self._cdf, rng.random(), side="right")), len(self.candidates) - 1)
        cand = self.candidates[drawn]
        plane = cand.inputs[int(rng.integers(0, len(cand.inputs)))]
        y = int(rng.integers(0, cand.shape[0] - self.patch_shape[0] + 1))
        x = int(rng.integers(0, cand.shape[1] - self.patch_shape[1] + 1))
        return cand.image, plane, (0, y, x)

    def origin(self, index: int, epoch: int | None = None) -> tuple[int, int, int]:
        """The (z, y, x) origin of patch ``index``, as ``RandomPatches.origin`` (its image: ``locate``)."""
        return self.locate(index, epoch)[2]

    def __getitem__(self, index: int) -> PairedPatch:
        image, plane, origin = self.locate(int(index))
        col, yx = self.collection, origin[1:]
        return PairedPatch(origin=origin, raw=col.read(image, plane, yx, self.patch_shape),
                           label=col.read(image, f"targets/{self.target}", yx, self.patch_shape), image=image,
                           input=plane)

    def __iter__(self):
        return (self[i] for i in range(self.length))

"""Issue 20: formats, geometry and normalize that must not give silently wrong data or useless advice.

- a classic (libtiff-style) TIFF cut short is refused, not read as fewer planes;
- geometry offsets are compared in voxels, voxel sizes relatively (one rule for params/source,
  labels/image and OME-Zarr grids);
- normalize reads the fetch record under the dataset lock, so provenance and voxels describe the
  same raw files;
- error advice is something that helps (not "fetch again" for an RGB TIFF, not a bare
  ``emdata fetch`` that answers "up to date"); DM3 spectral axes are not spatial; the HDF5
  writer's unraisable-exception hook is scoped and thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np
import pytest

from emdata.errors import FormatError
from emdata.testing.epfl import FOLDER
from emdata.testing.volumes import coordinate_volume, write_libtiff_stack, write_tiff_stack

DS = "epfl_hippocampus"
IMAGE = "volumedata.tif"


# -- item 7: the fetch record is read under the lock -------------------------------------------


def test_normalize_reads_the_fetch_record_under_the_lock(epfl_project, epfl_replica, monkeypatch) -> None:
    """A fetch that finishes just before normalize takes the lock: provenance must describe the new files."""
    import emdata.stages.normalize.volume as normalize_module
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    cfg = epfl_project
    raw = cfg.raw_dir(DS)
    fetch_dataset(cfg, DS)
    old = raw.with_name("old-fetch")
    shutil.move(raw, old)
    # The server's file changes (same size: EPFL pins only the size); the next fetch gets version B.
    served = epfl_replica.root / FOLDER / IMAGE
    new_volume = epfl_replica.arrays[IMAGE][::-1].copy()
    write_tiff_stack(served, new_volume)
    fetch_dataset(cfg, DS)
    new = raw.with_name("new-fetch")
    shutil.move(raw, new)
    shutil.move(old, raw)  # normalize starts with version A in place
    real_lock = normalize_module.dataset_lock

    @contextlib.contextmanager
    def lock_after_a_fetch(*args: Any, **kwargs: Any) -> Iterator[None]:
        # fetch renames its finished folder into place (pipeline._replace_dir), then normalize locks
        shutil.rmtree(raw)
        shutil.move(new, raw)
        with real_lock(*args, **kwargs):
            yield

    monkeypatch.setattr(normalize_module, "dataset_lock", lock_after_a_fetch)
    path = normalize_dataset(cfg, DS)
    with h5py.File(path, "r") as f:
        record = json.loads(f["provenance/source_record"][()])
        voxels = f["raw"][()]
    np.testing.assert_array_equal(voxels, new_volume)
    recorded = record["files"][IMAGE]["sha256"]
    assert recorded == hashlib.sha256((raw / IMAGE).read_bytes()).hexdigest(), \
        "the HDF5's provenance names the raw file of another fetch than its voxels came from"


# -- item 6: offsets compared in voxels, voxel sizes relatively ------------------------------------


def _resolve(pv=None, po=None, sv=None, so=None, trust=None):
    from emdata.core.geometry import resolve

    return resolve("ds", params_voxel=pv, params_offset=po, source_voxel=sv, source_offset=so, trust=trust)


def test_a_large_offset_does_not_widen_the_tolerance() -> None:
    """100000 nm against 100800 nm is 0.8 % of the offset but 100 voxels of 8 nm: a disagreement."""
    with pytest.raises(FormatError, match=r"offset_nm.*params.yaml says \[0, 100000, 0\] nm but the source says "
                                          r"\[0, 100800, 0\] nm"):
        _resolve(pv=(8, 8, 8), po=(0, 100000, 0), so=(0, 100800, 0))
    # float noise on a large offset still agrees: 0.004 nm is 0.0005 voxels
    g = _resolve(pv=(8, 8, 8), po=(0, 100000, 0), so=(0, 100000.004, 0))
    assert g.offset_nm == (0, 100000, 0) and g.origin["offset_nm"] == "params (source agrees)"
    # 1 % of a voxel is the limit, wherever the offset lies
    assert _resolve(pv=(8, 8, 8), po=(0, 0, 8e6), so=(0, 0, 8e6 + 0.07)).origin["offset_nm"] == "params (source agrees)"
    with pytest.raises(FormatError, match="offset_nm"):
        _resolve(pv=(8, 8, 8), po=(0, 0, 8e6), so=(0, 0, 8e6 + 0.09))


def test_voxel_sizes_compare_relatively() -> None:
    assert _resolve(pv=(50, 8, 8), sv=(50.4, 8.07, 8), po=(0, 0, 0)).origin["voxel_size_nm"] == "params (source agrees)"
    with pytest.raises(FormatError, match="voxel_size_nm"):
        _resolve(pv=(50, 8, 8), sv=(50, 8.1, 8), po=(0, 0, 0))


def test_one_grid_rule_for_geometry_and_ome_zarr() -> None:
    """geometry.same_grid is the rule; io.ngff.same_grid is it with a tolerance for float noise only."""
    from emdata.core import geometry
    from emdata.formats import ngff

    voxel = (8.0, 8.0, 8.0)
    for a, b in [((0, 0, 100000.0), (0, 0, 100800.0)), ((0, 0, 100000.0), (0, 0, 100000.0 + 4e-6)),
                 ((11.84, 0, 0), (11.840000000000002, 0, 0)), ((0, 0, 0), (0, 0, 0.05))]:
        assert ngff.same_grid(a, b, voxel) == geometry.same_grid(a, b, voxel, ngff.GRID_TOLERANCE)
    assert not ngff.same_grid((0, 0, 100000.0), (0, 0, 100800.0), voxel)
    assert geometry.same_grid((0, 0, 100000.0), (0, 0, 100000.05), voxel)  # 0.006 voxels
    assert not ngff.same_grid((0, 0, 100000.0), (0, 0, 100000.05), voxel)


def test_labels_on_a_far_offset_grid_are_refused(tmp_path) -> None:
    """normalize's label/image check: an offset 100 voxels away is another grid, however large the offsets."""
    from emdata.stages.normalize.arrays import check_labels as _check_labels
    from emdata.formats.raw import ArrayVolume

    array = np.zeros((3, 5, 7), np.uint8)
    image = ArrayVolume(array, "ds", voxel_size_nm=(8.0, 8.0, 8.0), offset_nm=(0.0, 100000.0, 0.0))
    near = ArrayVolume(array, "ds", voxel_size_nm=(8.0, 8.0, 8.0), offset_nm=(0.0, 100000.04, 0.0))
    far = ArrayVolume(array, "ds", voxel_size_nm=(8.0, 8.0, 8.0), offset_nm=(0.0, 100800.0, 0.0))
    _check_labels("ds", image, {"mito": near})
    with pytest.raises(FormatError, match="labels/mito.*offset_nm"):
        _check_labels("ds", image, {"mito": far})
    # the label alone reports geometry: its offset is measured in params' voxels
    bare = ArrayVolume(array, "ds", offset_nm=(0.0, 100000.0, 0.0))
    with pytest.raises(FormatError, match="offset_nm"):
        _check_labels("ds", bare, {"mito": ArrayVolume(array, "ds", offset_nm=(0.0, 100800.0, 0.0))}, (8.0, 8.0, 8.0))


# -- item 2: a classic TIFF cut short ---------------------------------------------------------------


def _directories_follow_data(path: Path) -> bool:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return all(page.offset >= max(page.dataoffsets) + max(page.databytecounts) for page in tif.pages)


def test_a_libtiff_stack_reads_whole(tmp_path) -> None:
    from emdata.formats.tiff import TiffStack

    volume = coordinate_volume((9, 13, 11))
    path = write_libtiff_stack(tmp_path / "whole.tif", volume)
    assert _directories_follow_data(path)
    with TiffStack(path, "ds") as stack:
        assert stack.shape == volume.shape
        np.testing.assert_array_equal(stack.read_box((0, 0, 0), volume.shape), volume)


@pytest.mark.parametrize("cut", [0.5, 0.3, 0.77])
def test_a_cut_libtiff_stack_is_refused(tmp_path, cut) -> None:
    """Cut anywhere (in a page's data, in a directory, after one): never fewer planes, always a FormatError."""
    from emdata.formats.tiff import TiffStack

    volume = coordinate_volume((9, 13, 11))
    whole = write_libtiff_stack(tmp_path / "whole.tif", volume).read_bytes()
    path = tmp_path / "cut.tif"
    path.write_bytes(whole[: int(len(whole) * cut)])
    with pytest.raises(FormatError) as err:
        TiffStack(path, "ds").close()
    text = str(err.value)
    assert str(path) in text and "\n" not in text


def test_a_cut_tifffile_page_chain_is_refused(tmp_path) -> None:
    """tifffile's own layout (directory, then data), one page per series, cut inside the last page's data."""
    import tifffile

    from emdata.formats.tiff import TiffStack

    volume = coordinate_volume((6, 13, 11))
    path = tmp_path / "pages.tif"
    with tifffile.TiffWriter(path) as writer:
        for plane in volume:
            writer.write(plane, contiguous=False, photometric="minisblack", metadata=None)
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        last = tif.pages[-1]
        cut = last.dataoffsets[0] + 50  # the last page's directory is whole, its strip is not
    path.write_bytes(data[:cut])
    with pytest.raises(FormatError, match=r"page 5's image data end at byte \d+ but the file has"):
        TiffStack(path, "ds").close()


def test_normalize_refuses_a_served_cut_libtiff_stack(epfl_project, epfl_replica) -> None:
    """End to end: the server serves a cut classic TIFF (size not pinned): fetch stores it, normalize refuses it."""
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset

    served = epfl_replica.root / FOLDER / IMAGE
    whole = write_libtiff_stack(served, epfl_replica.arrays[IMAGE]).read_bytes()
    served.write_bytes(whole[: len(whole) // 2])
    fetch_dataset(epfl_project, DS)
    with pytest.raises(FormatError, match="truncated"):
        normalize_dataset(epfl_project, DS)
    assert not epfl_project.processed_path(DS).exists()


def test_an_rgb_tiff_does_not_advise_fetching_again(tmp_path) -> None:
    import tifffile

    from emdata.formats.tiff import TiffStack

    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((3, 13, 11, 3), np.uint8), photometric="rgb")
    with pytest.raises(FormatError) as err:
        TiffStack(path, "ds")
    assert "samples per pixel" in err.value.problem
    assert "emdata fetch" not in err.value.hint and "convert" in err.value.hint


# -- item 16: DM3 spectral axes are not spatial ------------------------------------------------------


@pytest.mark.parametrize("meta", [{"Signal": "CL", "Format": "Spectrum image"}, {"Signal": "CL", "Format": "Image"},
                                  {"Signal": "", "Format": "Spectrum image"}])
def test_a_dm3_spectrum_in_nm_is_not_an_image(tmp_path, meta) -> None:
    """A CL line scan (wavelength in nm beside x in nm) has length units on both axes: still no image."""
    pytest.importorskip("rsciio")
    from emdata.formats.dm3 import open_dm3
    from emdata.testing.dm3 import calibration, dm3_bytes
    from emdata.testing.empiar import slice_tags

    tags = slice_tags(coordinate_volume((1, 13, 11))[0], 0)
    entry = tags["ImageList"][1]
    entry["ImageTags"]["Meta Data"].update(meta)
    entry["ImageData"]["Calibrations"]["Dimension"] = [calibration(0.5, "nm", origin=-800.0), calibration(8.0, "nm")]
    path = tmp_path / "spectrum.dm3"
    path.write_bytes(dm3_bytes(tags))
    with pytest.raises(FormatError, match="spectra, not a 2D image") as err:
        open_dm3(path, "ds")
    assert "emdata fetch" not in err.value.hint


def test_a_dm3_image_in_nm_is_still_read(tmp_path) -> None:
    pytest.importorskip("rsciio")
    from emdata.formats.dm3 import open_dm3
    from emdata.testing.dm3 import calibration, dm3_bytes
    from emdata.testing.empiar import slice_tags

    tags = slice_tags(coordinate_volume((1, 13, 11))[0], 0)
    tags["ImageList"][1]["ImageData"]["Calibrations"]["Dimension"] = [calibration(8.0, "nm"), calibration(8.0, "nm")]
    path = tmp_path / "image.dm3"
    path.write_bytes(dm3_bytes(tags))
    assert open_dm3(path, "ds").pixel_nm == (8.0, 8.0)


# -- item 16: after a garbage chunk, advice that helps ------------------------------------------------


@pytest.mark.s3
def test_a_garbage_s3_chunk_gets_advice_that_helps(tmp_path, make_project) -> None:
    """The service serves a chunk that does not decode: a bare `emdata fetch` then says "up to date",
    so normalize's advice must be to delete the copy first, and following it must work."""
    from emdata.stages.normalize.volume import normalize_dataset
    from emdata.stages.fetch import fetch_dataset
    from emdata.testing.contract import FAST_RETRIES
    from emdata.testing.registry import replica_for

    key = "openorganelle_jrc_mus_nacc_2"
    with replica_for("ome_zarr_s3").start(tmp_path / "replica") as omz:
        case = {c.key: c for c in omz.cases()}[key]
        cfg = make_project({key: case.dataset})
        good = omz.server.object_bytes(case.fault_path)
        omz.server.replace(case.fault_path, b"not a zstd/blosc frame " * (len(good) // 23 + 1))
        fetch_dataset(cfg, key, policy=FAST_RETRIES)
        with pytest.raises(FormatError) as err:
            normalize_dataset(cfg, key)
        hint = err.value.hint
        assert f"delete data/raw/{key}" in hint and f"emdata fetch {key}" in hint, hint
        assert fetch_dataset(cfg, key, policy=FAST_RETRIES).up_to_date  # why a bare fetch cannot help
        omz.server.clear_faults()  # the service is repaired; the advice, followed, gives the data
        shutil.rmtree(cfg.raw_dir(key))
        fetch_dataset(cfg, key, policy=FAST_RETRIES)
        with h5py.File(normalize_dataset(cfg, key), "r") as f:
            np.testing.assert_array_equal(f["raw"][()], case.expected["raw"])


# -- item 16: the HDF5 writer's unraisable hook is scoped and thread-safe ------------------------------


class _DiesWithOSError:
    """An object whose deallocation raises, as h5py's ObjectID.__dealloc__ does when HDF5's flush fails."""

    def __del__(self) -> None:
        raise OSError(28, "No space left on device (a dealloc elsewhere)")


def _die_with_oserror() -> None:
    _DiesWithOSError()  # dropped at once: Python hands the OSError to sys.unraisablehook


def test_interleaved_creates_restore_the_original_hook(tmp_path, monkeypatch) -> None:
    """A enters, B enters, A leaves, B leaves (two threads' normalizes): the hook is the original again."""
    from emdata.h5 import hdf5

    seen: list[BaseException] = []
    original = lambda unraisable: seen.append(unraisable.exc_value)  # noqa: E731
    monkeypatch.setattr(sys, "unraisablehook", original)
    a = hdf5.create(tmp_path / "a.h5", "a")
    b = hdf5.create(tmp_path / "b.h5", "b")
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    b.__exit__(None, None, None)
    assert sys.unraisablehook is original
    _die_with_oserror()
    assert len(seen) == 1


def test_a_dealloc_error_in_another_thread_is_not_this_files_failure(tmp_path, monkeypatch) -> None:
    """While one thread writes an HDF5, an unrelated dealloc error in another thread goes to the
    previous hook; it neither fails this file nor is swallowed."""
    from emdata.h5 import hdf5

    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    with hdf5.create(tmp_path / "ok.h5", "ds") as f:
        f.create_dataset("raw", data=np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
        other = threading.Thread(target=_die_with_oserror)
        other.start()
        other.join()
    assert [str(e) for e in seen] == ["[Errno 28] No space left on device (a dealloc elsewhere)"]
    with h5py.File(tmp_path / "ok.h5", "r") as f:
        assert f["raw"].shape == (2, 2, 3)


def test_a_dealloc_error_in_the_writing_thread_still_fails_the_file(tmp_path, monkeypatch) -> None:
    from emdata.errors import OutputError
    from emdata.h5 import hdf5

    seen: list[BaseException] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.exc_value))
    with pytest.raises(OutputError, match="disk became full"):
        with hdf5.create(tmp_path / "full.h5", "ds") as f:
            f.create_dataset("raw", data=np.zeros((2, 2, 3), np.uint8))
            _die_with_oserror()
    assert seen == []

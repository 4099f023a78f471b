"""Multipage TIFF reading: orientation from the file, validation, slab reads."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from emdata.errors import FormatError
from emdata.formats.tiff import TiffStack
from emdata.testing.volumes import coordinate_volume, write_tiff_stack


def test_pages_are_z_rows_are_y(tmp_path) -> None:
    vol = coordinate_volume((7, 11, 19))
    with TiffStack(write_tiff_stack(tmp_path / "v.tif", vol), "ds") as stack:
        assert stack.shape == (7, 11, 19) and stack.dtype == np.uint8
        np.testing.assert_array_equal(stack[2:5], vol[2:5])
        np.testing.assert_array_equal(stack.read_between((1, 2, 3), (6, 9, 17)), vol[1:6, 2:9, 3:17])
        np.testing.assert_array_equal(stack[3, 1:4, -5:], vol[3, 1:4, -5:])


@pytest.mark.parametrize("orientation, stored_from_display", [
    (1, lambda d: d),
    (3, lambda d: d[::-1, ::-1]),
    (4, lambda d: d[::-1, :]),
    (6, lambda d: np.rot90(d, 1)),   # stored rotated 90 degrees counter-clockwise
    (8, lambda d: np.rot90(d, -1)),  # stored rotated 90 degrees clockwise
])
def test_orientation_tag_is_applied(tmp_path, orientation, stored_from_display) -> None:
    display = coordinate_volume((3, 5, 9))
    path = tmp_path / "o.tif"
    with tifffile.TiffWriter(path) as writer:
        for section in display:
            writer.write(np.ascontiguousarray(stored_from_display(section)), photometric="minisblack",
                         extratags=[(274, "H", 1, orientation, True)])
    with TiffStack(path, "ds") as stack:
        assert stack.shape == display.shape
        np.testing.assert_array_equal(stack[:], display)
        np.testing.assert_array_equal(stack[1:3, 1:4, 2:7], display[1:3, 1:4, 2:7])


def test_big_endian_uint16(tmp_path) -> None:
    vol = coordinate_volume((4, 6, 10), np.uint16)
    path = write_tiff_stack(tmp_path / "be.tif", vol.astype(">u2"), byteorder=">")
    with TiffStack(path, "ds") as stack:
        assert stack.dtype == np.dtype("uint16")
        np.testing.assert_array_equal(stack[:], vol)


def test_corrupt_file_is_a_format_error(tmp_path) -> None:
    path = tmp_path / "bad.tif"
    path.write_bytes(b"II*\x00" + b"\xff" * 64)
    with pytest.raises(FormatError) as err:
        TiffStack(path, "my_ds")
    assert "my_ds" in str(err.value) and "bad.tif" in str(err.value) and "emdata fetch my_ds" in str(err.value)


def test_damaged_page_directory_gives_exact_data_or_a_format_error(tmp_path) -> None:
    vol = coordinate_volume((5, 40, 50))
    path = write_tiff_stack(tmp_path / "t.tif", vol)
    data = path.read_bytes()
    # Overwrite the directory of page 2 with garbage: never silently wrong voxels.
    with tifffile.TiffFile(path) as tif:
        offset = tif.pages[2].offset
    path.write_bytes(data[:offset] + b"\xfe" * 16 + data[offset + 16:])
    try:
        with TiffStack(path, "ds") as stack:
            got = stack[:]
    except FormatError:
        return
    np.testing.assert_array_equal(got, vol)  # the shaped series' data block is intact


def test_truncated_file_is_a_format_error(tmp_path) -> None:
    path = write_tiff_stack(tmp_path / "t.tif", coordinate_volume((8, 40, 50)))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated|not a readable TIFF|cannot be read"):
        with TiffStack(path, "ds") as stack:
            stack[:]


def test_imagej_hyperstack_with_channels_is_refused(tmp_path) -> None:
    path = tmp_path / "hyper.tif"
    tifffile.imwrite(path, np.zeros((3, 2, 9, 11), np.uint8), imagej=True, metadata={"axes": "ZCYX"})
    with pytest.raises(FormatError, match="axes are .*C"):
        TiffStack(path, "ds")


def test_imagej_z_stack_reads_with_pages_as_z(tmp_path) -> None:
    vol = coordinate_volume((6, 9, 11))
    path = tmp_path / "z.tif"
    tifffile.imwrite(path, vol, imagej=True, metadata={"axes": "ZYX"})
    with TiffStack(path, "ds") as stack:
        assert stack.shape == (6, 9, 11)
        np.testing.assert_array_equal(stack[2:5, 1:8, 3:10], vol[2:5, 1:8, 3:10])


def test_compressed_pages_read_plane_by_plane(tmp_path) -> None:
    vol = coordinate_volume((5, 33, 47), np.uint16)
    path = tmp_path / "c.tif"
    tifffile.imwrite(path, vol, compression="zlib", byteorder=">")
    with TiffStack(path, "ds") as stack:
        assert stack.dtype == np.dtype("uint16")
        np.testing.assert_array_equal(stack[1:4, 5:30, 2:40], vol[1:4, 5:30, 2:40])


def test_pages_of_different_shapes_are_rejected(tmp_path) -> None:
    path = tmp_path / "mixed.tif"
    with tifffile.TiffWriter(path) as writer:
        writer.write(np.zeros((4, 5), np.uint8), photometric="minisblack")
        writer.write(np.zeros((5, 4), np.uint8), photometric="minisblack")
    with pytest.raises(FormatError, match="page 1 is"):
        TiffStack(path, "ds")


def test_rgb_pages_are_rejected(tmp_path) -> None:
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, np.zeros((6, 7, 3), np.uint8), photometric="rgb")
    with pytest.raises(FormatError, match="greyscale"):
        TiffStack(path, "ds")


def test_a_truncated_imagej_stack_is_refused_not_shortened(tmp_path) -> None:
    """tifffile finds one page of a cut ImageJ file; the description's images= count says more."""
    planes = (np.arange(9 * 31 * 43) % 251).astype(np.uint8).reshape(9, 31, 43)
    whole = tmp_path / "ij.tif"
    tifffile.imwrite(whole, planes, imagej=True, byteorder=">", metadata={"axes": "ZYX"})
    with TiffStack(whole, "ds") as stack:
        assert stack.shape == (9, 31, 43)
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(FormatError, match="declares 9 planes but only 1 can be found; it is truncated"):
        TiffStack(cut, "ds")

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from LiverSegmentationLogic.errors import ImageReadError, InvalidImageError
from LiverSegmentationLogic.io.volumes import Geometry, Volume, read_volume, write_labelmap, write_seg_nrrd

OBLIQUE = Geometry(
    spacing=(0.8, 0.9, 3.0),
    origin=(-120.5, 33.25, 410.0),
    direction=tuple(sitk.VersorTransform((0.2, 0.3, 0.9), 0.4).GetMatrix()),
)


def _write(tmp_path, name, array, geometry=OBLIQUE):
    path = tmp_path / name
    sitk.WriteImage(Volume(array, geometry).to_sitk(), str(path))
    return path


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_formats_keep_full_geometry(tmp_path, ext):
    array = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    vol = read_volume(_write(tmp_path, "img" + ext, array))
    assert vol.array.shape == (5, 6, 7)
    np.testing.assert_allclose(vol.array, array, rtol=1e-6)
    assert vol.geometry.allclose(OBLIQUE, tol=1e-4)


def test_real_nifti(chaos_mr):
    vol = read_volume(chaos_mr / "image_1.nii.gz")
    assert vol.array.shape == (37, 256, 256)
    assert vol.geometry.spacing == pytest.approx((1.25, 1.25, 7.7), abs=1e-4)
    assert vol.geometry.direction_matrix[1, 1] == -1


def test_dicom_series_folder(chaos_ct):
    vol = read_volume(chaos_ct / "DICOM_anon")
    assert vol.array.shape == (78, 512, 512)
    assert vol.geometry.spacing == pytest.approx((0.7265625, 0.7265625, 2.0), abs=1e-4)
    # slices sorted by position: origin is the lowest z of the series
    assert vol.geometry.origin[2] == pytest.approx(1536.5)


def test_labelmap_lands_on_input_grid(tmp_path):
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:3, 2:4, 3:6] = 1
    for name in ("seg.nrrd", "seg.nii.gz"):
        back = read_volume(write_labelmap(tmp_path / name, labels, OBLIQUE), validate=False)
        np.testing.assert_array_equal(back.array, labels)
        assert back.geometry.allclose(OBLIQUE, tol=1e-4)


def test_seg_nrrd_has_named_segments(tmp_path):
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1:3, 2:4, 3:6] = 1
    labels[4, 0, 0] = 2
    segments = [
        {
            "label": 1,
            "name": "liver",
            "color": [0.87, 0.51, 0.4],
            "terminology": {
                "category": ["SCT", "123037004", "Anatomical Structure"],
                "type": ["SCT", "10200004", "Liver"],
            },
        },
        {"label": 2, "name": "spleen", "color": [0.6, 0.4, 0.6]},
    ]
    path = write_seg_nrrd(tmp_path / "case.seg.nrrd", labels, OBLIQUE, segments)
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["liver", "spleen"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2]
    assert seg["segments"][0]["color"] == pytest.approx([0.87, 0.51, 0.4])
    assert seg["segments"][0]["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert seg["segments"][0]["extent"] == [3, 5, 2, 3, 1, 2]
    # slicerio voxels are indexed (i, j, k); ours (k, j, i)
    np.testing.assert_array_equal(np.transpose(seg["voxels"], (2, 1, 0)), labels)
    np.testing.assert_allclose(seg["ijkToLPS"], OBLIQUE.index_to_lps(), atol=1e-4)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="No such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image")
    with pytest.raises(ImageReadError, match="Not a readable image"):
        read_volume(path)
    empty_dir = tmp_path / "dicom"
    empty_dir.mkdir()
    with pytest.raises(ImageReadError, match="No DICOM series"):
        read_volume(empty_dir)


def test_2d_and_4d_rejected(tmp_path):
    two_d = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.arange(16, dtype=np.float32).reshape(4, 4)), str(two_d))
    with pytest.raises(InvalidImageError, match="2D"):
        read_volume(two_d)
    four_d = tmp_path / "series.nii.gz"
    frames = [sitk.GetImageFromArray(np.random.rand(3, 4, 5).astype(np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(four_d))
    with pytest.raises(InvalidImageError, match="a 4D image"):
        read_volume(four_d)
    rgb = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(3, 4, 5, 3).astype(np.float32), isVector=True), str(rgb))
    with pytest.raises(InvalidImageError, match="3 components per voxel"):
        read_volume(rgb)
    single = _write(tmp_path, "single.nrrd", np.random.rand(1, 8, 8).astype(np.float32))
    with pytest.raises(InvalidImageError, match="single slice"):
        read_volume(single)


def test_nan_inf_and_constant_rejected(tmp_path):
    array = np.random.rand(4, 5, 6).astype(np.float32)
    array[1, 2, 3] = np.nan
    array[0, 0, 0] = np.inf
    with pytest.raises(InvalidImageError, match="2 voxels are NaN or infinite"):
        read_volume(_write(tmp_path, "nan.nrrd", array))
    with pytest.raises(InvalidImageError, match="empty"):
        read_volume(_write(tmp_path, "zeros.nrrd", np.zeros((4, 5, 6), np.int16)))

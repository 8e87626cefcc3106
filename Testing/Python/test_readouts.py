import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from LiverSegmentationLogic.errors import FatFractionError
from LiverSegmentationLogic.io.volumes import Geometry, Volume
from LiverSegmentationLogic.readouts.measurements import (
    detect_fat_fraction_unit,
    dixon_fat_fraction,
    erode_mm,
    fat_fraction_readout,
    label_volume_ml,
    resample_mask_to,
    segmentation_readouts,
)


def test_volume_counts_one_label_exactly():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[2:7, 2:6, 2:5] = 1  # 60 voxels
    labels[8, 8, 8] = 2
    geometry = Geometry((1.5, 2.0, 5.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert label_volume_ml(labels, geometry, 1) == pytest.approx(60 * 15.0 / 1000)
    assert label_volume_ml(labels, geometry, 2) == pytest.approx(15.0 / 1000)


@pytest.fixture(scope="module")
def liver_and_map_grid(sample_case):
    """The sample's reference liver and a PDFF map grid that differs in spacing, origin, extent
    and orientation (rotated 10 degrees about the z axis)."""
    image, labels = sample_case
    liver = Volume(labels == 1, image.geometry)
    rotation = sitk.VersorTransform((0, 0, 1), np.radians(10)).GetMatrix()
    centre = np.array(image.to_sitk().TransformContinuousIndexToPhysicalPoint([128, 128, 15]))
    shape = (30, 120, 130)  # (z, y, x) of the map
    spacing = np.array([2.2, 2.6, 6.0])
    direction = np.asarray(rotation).reshape(3, 3)
    origin = centre - direction @ (spacing * np.array(shape[::-1]) / 2)
    geometry = Geometry(tuple(spacing), tuple(origin), tuple(rotation))
    return liver, geometry, shape


def _map_with_rim(liver, geometry, shape, inside, rim, outside, rim_mm=4.0):
    """A PDFF map: `inside` deep in the liver, `rim` within rim_mm of its border, `outside` elsewhere."""
    mask = resample_mask_to(liver, geometry, shape)
    depth = ndimage.distance_transform_edt(mask, sampling=geometry.spacing[::-1])
    ff = np.full(shape, outside, np.float32)
    ff[mask] = rim
    ff[depth > rim_mm] = inside
    return Volume(ff, geometry)


def test_ff_readout_on_another_grid_with_margin(liver_and_map_grid):
    liver, geometry, shape = liver_and_map_grid
    ff_map = _map_with_rim(liver, geometry, shape, inside=8.0, rim=30.0, outside=90.0)
    no_margin = fat_fraction_readout(liver, ff_map, margin_mm=0.0)
    with_margin = fat_fraction_readout(liver, ff_map, margin_mm=5.0)
    assert no_margin["mean"] > 9.0  # partial-volume rim pulls the mean up
    assert with_margin["median"] == pytest.approx(8.0) and with_margin["mean"] == pytest.approx(8.0)
    assert with_margin["iqr"] == pytest.approx(0.0)
    assert with_margin["n_voxels"] < no_margin["n_voxels"]
    assert with_margin["unit"] == "percent" and with_margin["steatosis"] is True


def test_ff_fraction_unit_detected_and_reported_in_percent(liver_and_map_grid):
    liver, geometry, shape = liver_and_map_grid
    ff_map = _map_with_rim(liver, geometry, shape, inside=0.04, rim=0.3, outside=0.9)
    r = fat_fraction_readout(liver, ff_map, margin_mm=5.0)
    assert r["unit"] == "fraction"
    assert r["median"] == pytest.approx(4.0, abs=1e-4)
    assert r["steatosis"] is False


def test_ff_unit_detection_and_ambiguity():
    assert detect_fat_fraction_unit(np.array([0.0, 0.05, 0.9])) == "fraction"
    assert detect_fat_fraction_unit(np.array([0.0, 5.0, 90.0])) == "percent"
    with pytest.raises(FatFractionError, match="percent or fraction"):
        detect_fat_fraction_unit(np.array([0.0, 1.5, 2.0]))


def test_ff_map_that_does_not_overlap(liver_and_map_grid):
    liver, geometry, shape = liver_and_map_grid
    far = Geometry(geometry.spacing, tuple(np.array(geometry.origin) + 2000.0), geometry.direction)
    with pytest.raises(FatFractionError, match="does not overlap"):
        fat_fraction_readout(liver, Volume(np.full(shape, 5.0, np.float32), far))
    with pytest.raises(FatFractionError, match="smaller margin"):
        fat_fraction_readout(liver, _map_with_rim(liver, geometry, shape, 8.0, 30.0, 90.0), margin_mm=200.0)


def test_dixon_two_point_fat_fraction():
    geometry = Geometry((1, 1, 1), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    water, fat = np.full((3, 4, 4), 90.0), np.full((3, 4, 4), 10.0)
    in_phase, opposed = water + fat, np.abs(water - fat)
    in_phase[0, 0, 0] = opposed[0, 0, 0] = 0.0  # background
    ff = dixon_fat_fraction(Volume(in_phase, geometry), Volume(opposed, geometry))
    assert np.isnan(ff.array[0, 0, 0])
    np.testing.assert_allclose(ff.array[1:], 10.0, rtol=1e-5)
    other = Geometry((2, 1, 1), (0, 0, 0), geometry.direction)
    with pytest.raises(FatFractionError, match="same grid"):
        dixon_fat_fraction(Volume(in_phase, geometry), Volume(opposed, other))


def test_lesion_readout_counts_components_and_burden():
    geometry = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))  # 2 uL voxels
    labels = np.zeros((20, 30, 30), np.uint8)
    labels[2:18, 2:28, 2:28] = 1  # liver
    labels[4:6, 4:6, 4:6] = 2  # lesion 1: 8 voxels
    labels[10:13, 20:23, 20:23] = 2  # lesion 2: 27 voxels
    labels[13, 23, 23] = 2  # touches lesion 2 at a corner: 26-connected, the same lesion
    readout = segmentation_readouts(labels, geometry, [{"label": 1, "name": "liver"}, {"label": 2, "name": "lesion"}],
                                    readouts=["volume", "lesions"])
    lesions = readout["lesions"]
    assert lesions["count"] == 2
    assert lesions["volumes_ml"] == pytest.approx([28 * 0.002, 8 * 0.002])
    assert lesions["total_volume_ml"] == pytest.approx(36 * 0.002) == pytest.approx(readout["volumes_ml"]["lesion"])
    liver_with_lesions = 16 * 26 * 26
    assert lesions["burden_percent"] == pytest.approx(100 * 36 / liver_with_lesions)
    # not asked for by the model's card: not computed
    only_volumes = segmentation_readouts(labels, geometry, [{"label": 2, "name": "lesion"}], readouts=["volume"])
    assert only_volumes["lesions"] is None


def test_fat_fraction_reads_only_around_the_liver_with_the_same_result(liver_and_map_grid):
    """The readout crops the map to the liver's box before resampling and eroding (so one edit
    costs milliseconds on a large map): the figures equal those from the whole map."""
    liver, geometry, shape = liver_and_map_grid
    rng = np.random.default_rng(3)
    values = rng.uniform(0, 40, shape).astype(np.float32)
    values[:, :5] = 90.0  # some subcutaneous-like fat, for the unit detection
    ff_map = Volume(values, geometry)
    readout = fat_fraction_readout(liver, ff_map, margin_mm=4.0)
    whole_mask = resample_mask_to(liver, geometry, shape)
    depth = ndimage.distance_transform_edt(whole_mask, sampling=geometry.spacing[::-1])
    sample = values[depth > 4.0].astype(np.float64)
    assert readout["n_voxels"] == sample.size > 1000
    assert readout["median"] == pytest.approx(np.median(sample))
    assert readout["mean"] == pytest.approx(sample.mean())
    assert readout["unit"] == "percent"


@pytest.mark.parametrize("seed", range(4))
def test_erosion_is_the_distance_map_s_in_mm(seed):
    """The border-band erosion keeps exactly the voxels a Euclidean distance map says are deeper
    than the margin, on anisotropic grids, for masks that touch the array's edges too."""
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((24, 50, 60)), 3) > 0.5
    spacing = tuple(rng.uniform(0.5, 3.0, 3))
    for margin in (0.3, 1.0, 3.0, 4.5, 200.0):
        expected = ndimage.distance_transform_edt(mask, sampling=spacing) > margin
        assert np.array_equal(erode_mm(mask, spacing, margin), expected), (spacing, margin)


def test_a_map_on_the_mask_s_own_grid_is_sliced_like_a_resampling():
    """A map from the same acquisition (same spacing and direction, shifted by whole voxels,
    reaching past the mask's grid) gets the mask sliced, and the result equals a resampling."""
    rng = np.random.default_rng(0)
    geometry = Geometry((0.8, 0.9, 2.5), (10.0, -20.0, 5.0), tuple(np.eye(3)[[1, 0, 2]].ravel() * [1, 1, 1, -1, 1, 1,
                                                                                                   1, 1, 1]))
    mask = Volume(ndimage.gaussian_filter(rng.random((12, 30, 40)), 2) > 0.5, geometry)
    start = np.array([-3, 5, 7])  # k, j, i of the map's first voxel on the mask's grid
    origin = geometry.index_to_lps() @ np.array([*start[::-1], 1.0])
    target = Geometry(geometry.spacing, tuple(origin[:3]), geometry.direction)
    sliced = resample_mask_to(mask, target, (20, 30, 40))
    moved = Geometry(geometry.spacing, tuple(np.array(origin[:3]) + 1e-2), geometry.direction)  # not whole voxels
    assert sliced.sum() > 0 and np.array_equal(sliced, resample_mask_to(mask, moved, (20, 30, 40)))

import itertools

import numpy as np
import pytest
import torch

from LiverSegmentationLogic.io.volumes import Geometry, read_volume
from LiverSegmentationLogic.readouts.metrics import dice
from LiverSegmentationLogic.inference.preprocessing import (
    AxialReorientation,
    PreprocessConfig,
    neighbour_stack,
    normalise_intensity,
    prepare_labels,
    prepare_volume,
)


def _reoriented_copies(array: np.ndarray, spacing):
    """Every permutation/flip storage of the same LPS-aligned (z, y, x) array, with its geometry.

    Yields (stored array in (k, j, i) order, geometry) describing identical physical content.
    """
    for perm in itertools.permutations(range(3)):  # index axis a -> world axis perm[a]
        for signs in itertools.product((1, -1), repeat=3):
            direction = np.zeros((3, 3))
            for a in range(3):
                direction[perm[a], a] = signs[a]
            # stored[k, j, i]: index axis a runs along world axis perm[a] in direction signs[a]
            world_axes_of_numpy = [2 - perm[2 - n] for n in range(3)]
            stored = np.transpose(array, world_axes_of_numpy)
            for n in range(3):
                if signs[2 - n] < 0:
                    stored = np.flip(stored, axis=n)
            sp = tuple(spacing[2 - perm[a]] for a in range(3))  # spacing given in (z, y, x)
            yield np.ascontiguousarray(stored), Geometry(sp, (0.0, 0.0, 0.0), tuple(direction.ravel()))


def test_reorientation_finds_axial_view_from_any_storage():
    axial = np.random.default_rng(1).random((4, 5, 6))
    count = 0
    for stored, geometry in _reoriented_copies(axial, (3.0, 1.5, 1.0)):
        r = AxialReorientation(geometry)
        np.testing.assert_array_equal(r.forward(stored), axial)
        np.testing.assert_array_equal(r.inverse(r.forward(stored)), stored)
        assert r.spacing_zyx == (3.0, 1.5, 1.0)
        count += 1
    assert count == 48


def test_oblique_direction_picks_closest_axes():
    tilt = np.radians(20)
    direction = np.array([[np.cos(tilt), 0, np.sin(tilt)], [0, -1, 0], [-np.sin(tilt), 0, np.cos(tilt)]])
    r = AxialReorientation(Geometry((1, 2, 3), (0, 0, 0), tuple(direction.ravel())))
    stored = np.random.rand(3, 4, 5)
    assert r.forward(stored).shape == (3, 4, 5)
    assert r.flips == (1,)
    np.testing.assert_array_equal(r.inverse(r.forward(stored)), stored)


def test_normalisation_percentile_and_window():
    x = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    out = normalise_intensity(x, {"method": "percentile", "lower": 1, "upper": 99})
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert (out == 0).sum() > 1 and (out == 1).sum() > 1  # tails clipped
    ct = normalise_intensity(np.array([-1000.0, 40.0, 240.0]), {"method": "window", "center": 40, "width": 400})
    np.testing.assert_allclose(ct, [0.0, 0.5, 1.0])


def test_a_ct_window_takes_images_already_windowed_to_0_255_as_they_are():
    intensity = {"method": "window", "center": 40, "width": 400, "windowed_range": [0, 255]}
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1200.0])
    np.testing.assert_allclose(normalise_intensity(hu, intensity), [0.0, 0.0, 0.5, 1.0, 1.0])
    windowed = np.array([0.0, 51.0, 255.0])  # every value in 0-255: the publisher windowed it
    np.testing.assert_allclose(normalise_intensity(windowed, intensity), [0.0, 0.2, 1.0])
    # decided on the whole image: a liver region in HU (40-200) must not pass for 0-255
    image = np.full((2, 8, 8), -1000.0, np.float32)
    image[:, 2:6, 2:6] = 200.0
    mask = image > 0
    out = normalise_intensity(image, intensity, mask)
    np.testing.assert_allclose(out[mask], 0.9)
    assert out[~mask].max() == 0.0


def test_raw_hu_ct_and_the_same_ct_windowed_to_0_255_give_the_model_the_same_input(chaos_ct):
    """The CHAOS CT case in HU, and as a LiTS-like publisher would store it (W400 L40 to 0-255):
    the CT task's window gives the network the same picture of both; per-image percentiles do not
    (the soft tissue lands ~0.4 apart), which is what the liver-ct model saw on raw-HU CT."""
    from LiverSegmentationLogic.models.tasks import load_task

    hu = read_volume(chaos_ct / "DICOM_anon").array
    stored = np.rint(np.clip((hu + 160.0) / 400.0 * 255.0, 0, 255))
    window = load_task("liver-ct").preprocess_config().intensity
    assert np.abs(normalise_intensity(hu, window) - normalise_intensity(stored, window)).max() <= 0.5 / 255 + 1e-6
    percentile = {"method": "percentile", "lower": 0.5, "upper": 99.5}
    fat = (hu > -150) & (hu < -50)
    gap = normalise_intensity(hu, percentile)[fat].mean() - normalise_intensity(stored, percentile)[fat].mean()
    assert gap > 0.3


def test_ct_without_the_scanner_rescale_or_an_mr_image_is_refused_by_the_ct_window(chaos_ct, sample_case):
    """Stored CT values (HU + 1024, never below 0) or an MR image would be clipped to a blank by a
    window in HU; per-image percentiles hid such a mistake, a window must refuse it."""
    from LiverSegmentationLogic.errors import InvalidImageError
    from LiverSegmentationLogic.models.tasks import load_task

    window = load_task("liver-ct").preprocess_config().intensity
    stored = read_volume(chaos_ct / "DICOM_anon").array + 1024.0
    with pytest.raises(InvalidImageError, match="RescaleIntercept"):
        normalise_intensity(stored, window)
    mr, _ = sample_case
    with pytest.raises(InvalidImageError, match="Hounsfield"):
        normalise_intensity(mr.array, window)


def test_config_validation():
    with pytest.raises(ValueError, match="neighbours"):
        PreprocessConfig(neighbours=-1)
    with pytest.raises(ValueError, match="percentiles"):
        PreprocessConfig(intensity={"method": "percentile", "lower": 90, "upper": 10})
    with pytest.raises(ValueError, match="windowed_range"):
        PreprocessConfig(intensity={"method": "window", "center": 40, "width": 400, "windowed_range": [255, 0]})
    with pytest.raises(ValueError, match="intensity method"):
        PreprocessConfig(intensity={"method": "zscore"})
    cfg = PreprocessConfig(spacing_xy=(1.5, 1.5), neighbours=2)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg and cfg.in_channels == 5


def test_neighbour_stack_replicates_edges():
    image = np.arange(5)[:, None, None] * np.ones((5, 2, 2))
    stack = neighbour_stack(image, [0, 2, 4], k=2)
    assert stack.shape == (3, 5, 2, 2)
    np.testing.assert_array_equal(stack[:, :, 0, 0], [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [2, 3, 4, 4, 4]])


def test_prepare_and_invert_on_real_volume(chaos_mr):
    image = read_volume(chaos_mr / "image_2.nii.gz")
    labels = np.rint(read_volume(chaos_mr / "label_2.nii.gz", validate=False).array).astype(np.uint8)
    config = PreprocessConfig(spacing_xy=(2.0, 2.0))
    prepared = prepare_volume(image.array, image.geometry, config)
    z, h, w = prepared.image.shape
    assert h % 16 == 0 and w % 16 == 0 and z == image.array.shape[0]
    assert prepared.resampled_hw == (160, 160)  # 256 x 1.25 mm / 2 mm
    model_labels = prepare_labels(labels, prepared)
    assert set(np.unique(model_labels)) == {0, 1, 2, 3, 4}  # nearest neighbour keeps label values
    # back to the input grid: the labelmap survives the round trip nearly intact
    onehot = torch.from_numpy((model_labels[:, None] == 1).astype(np.float32))
    axial_back = prepared.to_input_grid(onehot)[:, 0].numpy() > 0.5
    back = prepared.reorientation.inverse(axial_back)
    assert back.shape == labels.shape
    assert dice(back, labels == 1) > 0.97


def test_padding_for_odd_sizes():
    geometry = Geometry((1.0, 1.0, 5.0), (0, 0, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = np.random.rand(3, 37, 50).astype(np.float32)
    prepared = prepare_volume(image, geometry, PreprocessConfig(spacing_xy=(1.0, 1.0)))
    assert prepared.image.shape == (3, 48, 64)
    logits = torch.from_numpy(prepared.image[:, None])
    expected = normalise_intensity(image, PreprocessConfig().intensity)
    np.testing.assert_allclose(prepared.to_input_grid(logits)[:, 0].numpy(), expected)


def test_multichannel_input_is_normalised_per_channel_and_stacked():
    rng = np.random.default_rng(0)
    t2 = rng.normal(100, 10, (6, 32, 32)).astype(np.float32)
    other = rng.normal(5000, 900, (6, 32, 32)).astype(np.float32)  # another scale entirely
    config = PreprocessConfig(spacing_xy=(1.0, 1.0), neighbours=1, channels=2)
    prepared = prepare_volume(np.stack([t2, other]), Geometry.identity(), config)
    assert prepared.image.shape == (2, 6, 32, 32)
    for c in range(2):  # each channel spans 0-1 on its own
        assert prepared.image[c].min() == 0.0 and prepared.image[c].max() == 1.0
    batch = neighbour_stack(prepared.image, [0, 5], 1)
    assert batch.shape == (2, config.in_channels, 32, 32) == (2, 6, 32, 32)
    np.testing.assert_array_equal(batch[0, 1], prepared.image[0, 0])  # channel 1, centre slice
    np.testing.assert_array_equal(batch[0, 4], prepared.image[1, 0])  # channel 2, centre slice
    with pytest.raises(ValueError, match="takes 2 input channel"):
        prepare_volume(t2, Geometry.identity(), config)


def test_roi_mask_windows_inside_the_region_and_blanks_outside():
    array = np.zeros((4, 20, 20), np.float32)
    array[:, 5:15, 5:15] = np.linspace(100, 200, 100).reshape(10, 10)  # the organ
    array[:, 0, 0] = 5000  # a bright outlier outside it
    mask = np.zeros(array.shape, bool)
    mask[:, 5:15, 5:15] = True
    config = PreprocessConfig(spacing_xy=(1.0, 1.0), neighbours=0, intensity={"method": "percentile", "lower": 0,
                                                                               "upper": 100})
    image = prepare_volume(array, Geometry.identity(), config, roi_mask=mask).image
    inside = image[:, 11:21, 11:21]  # padded from 20 to 32, centred: the organ moves by 6
    assert inside.min() == 0.0 and inside.max() == 1.0  # the organ's own range, not the outlier's
    assert np.count_nonzero(image) <= mask.sum() and image[:, 6, 6].max() == 0.0


def test_crop_volume_keeps_physical_positions():
    from LiverSegmentationLogic.io.volumes import Volume, crop_volume

    direction = (0, 1, 0, -1, 0, 0, 0, 0, 1)  # rotated in-plane
    geometry = Geometry((0.5, 0.7, 3.0), (10.0, -4.0, 2.0), direction)
    volume = Volume(np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7), geometry)
    crop = crop_volume(volume, (slice(1, 4), slice(2, 6), slice(3, 7)))
    assert crop.array.shape == (3, 4, 4)
    # voxel (i, j, k) = (0, 0, 0) of the crop is voxel (3, 2, 1) of the original, at the same point
    np.testing.assert_allclose(crop.geometry.index_to_lps() @ [0, 0, 0, 1], geometry.index_to_lps() @ [3, 2, 1, 1])
    assert crop.array[0, 0, 0] == volume.array[1, 2, 3]

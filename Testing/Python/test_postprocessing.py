import numpy as np

from LiverSegmentationLogic.inference.postprocessing import largest_component, postprocess_labels


def test_largest_component_and_hole_filling():
    labels = np.zeros((6, 20, 20), np.uint8)
    labels[1:5, 2:12, 2:12] = 1  # the organ, 400 voxels
    labels[2:4, 5:8, 5:8] = 0  # a hole inside it, 18 voxels
    labels[1, 16:18, 16:18] = 1  # a small false positive, 4 voxels
    labels[3, 15:19, 15:19] = 2  # another class, untouched
    out = postprocess_labels(labels, {1: {"largest_component": True, "fill_holes": True}})
    assert (out == 1).sum() == 400
    assert out[1, 16, 16] == 0
    assert (out == 2).sum() == 16


def test_fill_holes_never_overwrites_other_classes():
    labels = np.zeros((1, 9, 9), np.uint8)
    labels[0, 1:8, 1:8] = 1
    labels[0, 4, 4] = 2  # a lesion inside the liver
    labels[0, 3, 3] = 0  # a real hole
    out = postprocess_labels(labels, {1: {"fill_holes": True}})
    assert out[0, 4, 4] == 2 and out[0, 3, 3] == 1


def test_largest_component_is_26_connected():
    mask = np.zeros((3, 3, 3), bool)
    mask[0, 0, 0] = mask[1, 1, 1] = mask[2, 2, 2] = True  # diagonal chain: one component
    assert largest_component(mask).sum() == 3


def test_working_in_each_class_box_gives_what_the_whole_volume_gives(sample_case):
    """Postprocessing runs inside each class's bounding box (the speed of the contrast check's
    extra passes depends on it); on a messy real labelmap (the sample's organs with speckles,
    holes, a hole open to the box's edge and a class touching the image border) the result is
    that of the same rules over the whole volume."""
    from LiverSegmentationLogic.inference.postprocessing import fill_holes_per_slice

    _, reference = sample_case
    rng = np.random.default_rng(0)
    labels = reference.astype(np.uint8)
    labels[rng.random(labels.shape) < 0.002] = 1  # speckles of the first class
    labels[rng.random(labels.shape) < 0.05] = 0  # holes
    labels[rng.random(labels.shape) < 0.001] = 3  # speckles of a third class
    labels[:, :3, :] = 2  # a class along the image border
    rules = {1: {"largest_component": True, "fill_holes": True}, 2: {"fill_holes": True},
             3: {"largest_component": True}}
    expected = labels.copy()
    for label, rule in rules.items():
        mask = expected == label
        if rule.get("largest_component"):
            keep = largest_component(mask)
            expected[mask & ~keep] = 0
            mask = keep
        if rule.get("fill_holes"):
            expected[fill_holes_per_slice(mask) & (expected == 0)] = label
    out = postprocess_labels(labels, rules)
    assert np.array_equal(out, expected)
    assert not np.array_equal(out, labels)  # the rules did change something

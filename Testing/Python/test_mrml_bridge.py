"""The MRML bridge on a real MRML scene (PyPI slicer-core, no Qt, no Slicer application)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from LiverSegmentationLogic.io.volumes import Geometry, Volume
from LiverSegmentationLogic.readouts.metrics import dice

slicer = pytest.importorskip("slicer", reason="slicer-core (PyPI) is not installed")


@pytest.fixture()
def bridge(scene):
    from LiverSegmentationLib import mrml_bridge

    return mrml_bridge


OBLIQUE = Geometry(
    spacing=(0.9, 1.1, 3.5),
    origin=(-101.25, 87.5, -320.0),
    direction=tuple(sitk.VersorTransform((0.3, -0.2, 0.93), 0.35).GetMatrix()),
)


def test_module_files_import_no_qt():
    source = (Path(__file__).resolve().parents[2] / "LiverSegmentation/LiverSegmentationLib/mrml_bridge.py").read_text()
    assert "import qt" not in source and "from qt" not in source and "ctk" not in source


def test_geometry_round_trip_oblique(bridge, tmp_path):
    array = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    node = bridge.add_volume_node(Volume(array, OBLIQUE), "oblique")
    back = bridge.volume_from_node(node)
    np.testing.assert_array_equal(back.array, array)
    assert back.geometry.allclose(OBLIQUE, tol=1e-6)
    # independent check of the RAS/LPS handling: Slicer's own storage node writes the file,
    # SimpleITK reads it
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "oblique.nrrd"))
    assert storage.WriteData(node)
    image = sitk.ReadImage(str(tmp_path / "oblique.nrrd"))
    np.testing.assert_allclose(image.GetOrigin(), OBLIQUE.origin, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), OBLIQUE.direction, atol=1e-5)
    np.testing.assert_allclose(image.GetSpacing(), OBLIQUE.spacing, atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)


@pytest.fixture()
def liver_segmentation(bridge, sample_case, sample_result, default_model):
    image, _ = sample_case
    volume_node = bridge.add_volume_node(image, "sample")
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    seg_node = bridge.segmentation_from_labels(
        sample_result.labels, image.geometry, default_model.classes, volume_node
    )
    added = slicer.mrmlScene.GetNumberOfNodes() - nodes
    assert added == 2  # the segmentation and its display node, no temporary leftovers
    return volume_node, seg_node


def test_segmentation_from_real_prediction(bridge, liver_segmentation, sample_result, default_model):
    volume_node, seg_node = liver_segmentation
    segmentation = seg_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver"))
    assert segment.GetColor() == pytest.approx(default_model.classes[0]["color"], abs=1e-6)
    import vtk

    tag = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", tag)
    assert "SCT^10200004^Liver" in str(tag)
    labels = bridge.labels_from_segmentation(seg_node, volume_node, default_model.classes)
    np.testing.assert_array_equal(labels, sample_result.labels)
    readout = bridge.readouts_from_segmentation(seg_node, volume_node, default_model.classes)
    voxels = np.count_nonzero(sample_result.labels == 1)
    assert readout["volumes_ml"]["liver"] == pytest.approx(voxels * np.prod(volume_node.GetSpacing()) / 1000)


def test_readout_follows_an_edit(bridge, liver_segmentation, sample_result, default_model, sample_case):
    import slicer.util

    volume_node, seg_node = liver_segmentation
    classes = default_model.classes
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    before = bridge.readouts_from_segmentation(seg_node, volume_node, classes)["volumes_ml"]["liver"]
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes  # a readout leaves no temporary nodes behind
    segment_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, volume_node)
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    removed = int(mask[z].sum())
    mask[z] = 0  # the operator erases the fullest slice
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg_node, segment_id, volume_node)
    after = bridge.readouts_from_segmentation(seg_node, volume_node, classes)
    voxel_ml = np.prod(volume_node.GetSpacing()) / 1000
    assert after["volumes_ml"]["liver"] == pytest.approx(before - removed * voxel_ml)
    # with a PDFF map the fat fraction is read inside the edited mask
    image, reference = sample_case
    ff_map = Volume(np.where(reference == 1, 7.5, 85.0).astype(np.float32), image.geometry)
    ff_node = bridge.add_volume_node(ff_map, "ff")
    after_ff = bridge.readouts_from_segmentation(seg_node, volume_node, classes, ff_volume_node=ff_node)
    assert after_ff["fat_fraction"]["median"] == pytest.approx(7.5)
    table = bridge.readout_table(after_ff, {"name": "liver-mr-t2", "version": "x"})
    assert table.GetNumberOfRows() >= 7
    assert table.GetTable().GetValue(0, 1).ToString() == f"{after['volumes_ml']['liver']:.2f}"


def test_export_to_queue_matches_the_edit(bridge, liver_segmentation, sample_result, default_model, tmp_path):
    import slicerio
    import slicer.util

    volume_node, seg_node = liver_segmentation
    segment_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, volume_node)
    mask[:, :, :40] = 0  # an edit
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg_node, segment_id, volume_node)
    record = bridge.export_case_to_queue(
        tmp_path / "queue", volume_node, seg_node, default_model.classes, suggestion=sample_result.labels,
        meta={"study": "TRIAL-01", "operator": "ana", "model": "liver-mr-t2 1.0.0"},
    )
    case = record["case_id"]
    label = sitk.ReadImage(str(tmp_path / "queue" / "labelsTr" / f"{case}.nii.gz"))
    image = sitk.ReadImage(str(tmp_path / "queue" / "imagesTr" / f"{case}_0000.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), mask)
    np.testing.assert_allclose(image.GetOrigin(), bridge.geometry_from_volume_node(volume_node).origin, atol=1e-4)
    expected_dice = dice(sample_result.labels == 1, mask == 1)
    assert record["suggestion_dice"]["liver"] == pytest.approx(expected_dice) and expected_dice < 1.0
    assert record["changed_volume_ml"]["liver"] < 0
    changed = sample_result.labels != mask  # the operator's effort, kept with the queued case
    assert record["changed_voxels"] == np.count_nonzero(changed) > 0
    assert record["slices_touched"] == [int(z) for z in np.flatnonzero(changed.any(axis=(1, 2)))]
    meta = json.loads((tmp_path / "queue" / "meta" / f"{case}.json").read_text())
    assert meta["operator"] == "ana" and meta["source_volume"] == "sample"
    # the segmentation node saved by Slicer's own storage node opens in slicerio with the same voxels
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(tmp_path / "edited.seg.nrrd"))
    assert storage.WriteData(seg_node)
    seg = slicerio.read_segmentation(str(tmp_path / "edited.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["liver"]
    assert int((seg["voxels"] == seg["segments"][0]["labelValue"]).sum()) == int(mask.sum())


def test_an_edit_fires_the_event_the_panel_watches(bridge, liver_segmentation):
    """The panel refreshes its readout on SourceRepresentationModified from the node."""
    import slicer.util

    volume_node, seg_node = liver_segmentation
    fired = []
    tag = seg_node.AddObserver(slicer.vtkSegmentation.SourceRepresentationModified, lambda *a: fired.append(a))
    segment_id = seg_node.GetSegmentation().GetSegmentIdBySegmentName("liver")
    mask = slicer.util.arrayFromSegmentBinaryLabelmap(seg_node, segment_id, volume_node)
    mask[:, :, :10] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, seg_node, segment_id, volume_node)
    seg_node.RemoveObserver(tag)
    assert fired

"""The MRML bridge: the only code that touches Slicer nodes. Uses ``slicer`` and ``slicer.util``
only (no Qt), so it runs headless on the PyPI package slicer-core.

Slicer stores geometry in RAS; the core works in LPS (ITK/DICOM). Conversions flip x and y.
"""

from __future__ import annotations

import contextlib
import datetime
from typing import Optional, Sequence

import numpy as np
import slicer
import slicer.util
import vtk

from LiverSegmentationLogic.io.volumes import Geometry, Volume, terminology_string
from LiverSegmentationLogic.readouts.measurements import segmentation_readouts

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


# ----------------------------------------------------------------------------- volumes
class TransformError(ValueError):
    """A node sits under a transform that cannot be applied to its grid (a non-linear one)."""


def geometry_from_volume_node(node, world: bool = True) -> Geometry:
    """A volume node's grid as a core :class:`Geometry` (LPS).

    Args:
        world: apply the node's parent transforms, as Slicer shows the volume (a linear transform
            only: a warped volume has no grid of its own; harden the transform first). False: the
            node's own grid, before any transform.
    """
    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
    transform = node.GetParentTransformNode() if world else None
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise TransformError(f"{node.GetName()} is under the non-linear transform {transform.GetName()}: "
                                 "harden the transform (Data module) before segmenting or measuring it")
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        m = slicer.util.arrayFromVTKMatrix(to_world) @ m
    spacing = np.linalg.norm(m[:3, :3], axis=0)  # a scaling transform changes the voxel size
    direction_ras = m[:3, :3] / spacing  # columns: unit directions of i, j, k
    direction = LPS_FROM_RAS @ direction_ras
    origin = LPS_FROM_RAS @ m[:3, 3]
    return Geometry(tuple(spacing), tuple(origin), tuple(direction.ravel()))


def ijk_to_ras_from_geometry(geometry: Geometry) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = LPS_FROM_RAS @ geometry.direction_matrix @ np.diag(geometry.spacing)
    m[:3, 3] = LPS_FROM_RAS @ np.asarray(geometry.origin)
    return m


def volume_from_node(node, world: bool = True) -> Volume:
    """Voxels (a copy, (k, j, i) order) and geometry (in world coordinates, see
    :func:`geometry_from_volume_node`) of a scalar volume node."""
    return Volume(np.array(slicer.util.arrayFromVolume(node)), geometry_from_volume_node(node, world))


def volume_shape(node) -> tuple:
    """(k, j, i) voxel counts of a volume node."""
    return tuple(int(n) for n in node.GetImageData().GetDimensions()[::-1])


def add_volume_node(volume: Volume, name: str, labelmap: bool = False):
    """A new volume (or labelmap volume) node holding ``volume``."""
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    return slicer.util.addVolumeFromArray(
        np.ascontiguousarray(volume.array), ijkToRAS=ijk_to_ras_from_geometry(volume.geometry),
        name=name, nodeClassName=class_name,
    )


# ----------------------------------------------------------------------------- segmentations
def segmentation_from_labels(
    labels: np.ndarray,
    geometry: Geometry,
    classes: Sequence[dict],
    reference_volume_node,
    name: str = "Liver segmentation",
    segmentation_node=None,
):
    """Fill a segmentation node (new or given; its old segments are removed) with one named,
    coloured segment per class, with standard terminology, referencing the source volume's grid.

    Args:
        labels: (k, j, i) labelmap on ``geometry``, the source volume's own grid (``world=False``):
            the segmentation is placed under the source volume's transform.
        classes: the model card's classes (label, name, color, terminology).
    """
    if segmentation_node is None:
        segmentation_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        segmentation_node.CreateDefaultDisplayNodes()
    segmentation = segmentation_node.GetSegmentation()
    segmentation.RemoveAllSegments()
    # the labels lie on the source volume's own grid, so they follow its transform
    segmentation_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    with _temporary_nodes():
        labelmap_node = add_volume_node(Volume(labels.astype(np.uint8), geometry), "__labels__", labelmap=True)
        labelmap_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())  # no resampling
        for cls in classes:
            segment_id = segmentation.AddEmptySegment(cls["name"], cls["name"], list(cls["color"]))
            mask = (labels == cls["label"]).astype(np.uint8)
            slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation_node, segment_id, labelmap_node)
            if cls.get("terminology"):
                segmentation.GetSegment(segment_id).SetTag("TerminologyEntry", terminology_string(cls["terminology"]))
    return segmentation_node


def labels_from_segmentation(segmentation_node, reference_volume_node, classes: Sequence[dict]) -> np.ndarray:
    """The (possibly edited) segmentation as a labelmap on the source volume's grid.

    Segments are matched to classes by name. Every segment is exported into one labelmap in which
    segment n gets value n + 1; voxels are then mapped to class labels by that value (shared
    internal labelmaps hold several values, so a value test, not ``> 0``, is what counts).
    """
    segmentation = segmentation_node.GetSegmentation()
    ids, labels_for_value = vtk.vtkStringArray(), {}
    for cls in classes:
        segment_id = segmentation.GetSegmentIdBySegmentName(cls["name"])
        if segment_id:
            ids.InsertNextValue(segment_id)
            labels_for_value[ids.GetNumberOfValues()] = cls["label"]
    shape = slicer.util.arrayFromVolume(reference_volume_node).shape
    out = np.zeros(shape, dtype=np.uint8)
    if ids.GetNumberOfValues() == 0:
        return out
    with _temporary_nodes():
        labelmap_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__export__")
        labelmap_node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
        logic = slicer.modules.segmentations.logic()
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap_node, reference_volume_node):
            raise RuntimeError("Exporting the segmentation to a labelmap failed")
        exported = slicer.util.arrayFromVolume(labelmap_node)
        for value, label in labels_for_value.items():
            out[exported == value] = label
    return out


@contextlib.contextmanager
def _temporary_nodes():
    """Remove every node added to the scene inside the block: a temporary labelmap brings display
    and colour-table nodes with it, and the readout is recomputed on every edit, so anything left
    behind would pile up in the operator's scene."""
    scene = slicer.mrmlScene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        yield
    finally:
        added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        for node in added:
            if node.GetID() not in before:
                scene.RemoveNode(node)


# ----------------------------------------------------------------------------- readouts
def readouts_from_segmentation(
    segmentation_node,
    reference_volume_node,
    classes: Sequence[dict],
    ff_volume_node=None,
    margin_mm: float = 3.0,
    ff_unit: str = "auto",
) -> dict:
    """Volumes (mL) per class and the liver PDFF of the *current* segmentation (edits included)."""
    labels = labels_from_segmentation(segmentation_node, reference_volume_node, classes)
    ff_map = volume_from_node(ff_volume_node) if ff_volume_node is not None else None
    return segmentation_readouts(labels, geometry_from_volume_node(reference_volume_node), classes, ff_map,
                                 margin_mm, ff_unit)


def save_table(table_node, path) -> None:
    """Write a table node as CSV; raises OSError when it cannot (``slicer.util.saveNode`` only
    returns False, so a failed save went unnoticed)."""
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.WriteData(table_node):
            raise OSError(f"{path} could not be saved (check the folder exists and is writable)")
    finally:
        slicer.mrmlScene.RemoveNode(storage)


def jump_to(scene, position_lps: Sequence[float]):
    """Centre every slice view of the scene on a point (LPS, as the core reports positions)."""
    x, y, z = (float(v) for v in position_lps)
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, -x, -y, z, slicer.vtkMRMLSliceNode.CenteredJumpSlice)


# ----------------------------------------------------------------------------- the suggestion
SUGGESTION_ROLE = "LiverSegmentationSuggestion"


def store_suggestion(segmentation_node, labels: np.ndarray, reference_volume_node):
    """Keep the model's suggestion with the segmentation: a hidden labelmap node on the source
    volume's grid, referenced from the segmentation, saved with the scene. The review record
    (Dice, changed volume) is measured against it, whatever happens to node IDs."""
    old = segmentation_node.GetNodeReference(SUGGESTION_ROLE)
    if old is not None:
        slicer.mrmlScene.RemoveNode(old)
    geometry = geometry_from_volume_node(reference_volume_node, world=False)
    node = add_volume_node(Volume(labels.astype(np.uint8), geometry), f"{segmentation_node.GetName()} suggestion",
                           labelmap=True)
    node.SetHideFromEditors(True)
    node.SetAttribute("LiverSegmentation.Role", "suggestion")
    node.SetAndObserveTransformNodeID(reference_volume_node.GetTransformNodeID())
    segmentation_node.SetNodeReferenceID(SUGGESTION_ROLE, node.GetID())
    return node


def suggestion_of(segmentation_node) -> Optional[np.ndarray]:
    """The model's suggestion stored with this segmentation (None for one the model did not make)."""
    node = segmentation_node.GetNodeReference(SUGGESTION_ROLE)
    if node is None or node.GetImageData() is None:
        return None
    return np.array(slicer.util.arrayFromVolume(node))


def readout_table(readout: dict, model: Optional[dict] = None, table_node=None):
    """Write a readout into a table node (Measurement, Value, Unit); returns the node."""
    if table_node is None:
        table_node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", "Liver readouts")
    table = table_node.GetTable()
    table.Initialize()
    columns = [vtk.vtkStringArray() for _ in range(3)]
    for column, title in zip(columns, ("Measurement", "Value", "Unit")):
        column.SetName(title)
        table.AddColumn(column)
    rows = [(f"{name} volume", f"{ml:.2f}", "mL") for name, ml in readout["volumes_ml"].items()]
    ff = readout.get("fat_fraction")
    if ff:
        rows += [
            ("liver PDFF median", f"{ff['median']:.2f}", "%"),
            ("liver PDFF mean", f"{ff['mean']:.2f}", "%"),
            ("liver PDFF IQR", f"{ff['iqr']:.2f}", "%"),
            ("PDFF voxels", str(ff["n_voxels"]), "voxels"),
            ("steatosis (PDFF > 5.56 %)", "yes" if ff["steatosis"] else "no", ""),
        ]
    lesions = readout.get("lesions")
    if lesions:
        burden = lesions["burden_percent"]
        rows += [
            ("lesion count", str(lesions["count"]), ""),
            ("lesion volume", f"{lesions['total_volume_ml']:.2f}", "mL"),
            ("lesion burden", "n/a" if burden is None else f"{burden:.2f}", "% of liver"),
        ]
    quality = readout.get("quality")
    if quality:
        rows.append(("quality", quality["status"], "; ".join(quality["reasons"])))
    if model:
        rows.append(("model", f"{model['name']} {model['version']}", ""))
    rows.append(("computed", datetime.datetime.now().isoformat(timespec="seconds"), ""))
    for row in rows:
        index = table.InsertNextBlankRow()
        for column, value in enumerate(row):
            table.SetValue(index, column, vtk.vtkVariant(value))
    table_node.Modified()
    return table_node


# ----------------------------------------------------------------------------- export
def reviewed_case(
    volume_node,
    segmentation_node,
    classes: Sequence[dict],
    suggestion: Optional[np.ndarray] = None,
    meta: Optional[dict] = None,
) -> tuple[Volume, np.ndarray, dict]:
    """The reviewed case, ready to queue: the source image, the corrected labelmap and a meta
    record with the Dice between the model's suggestion and the correction (how much the
    operator changed), the changed volume and the source node names."""
    from LiverSegmentationLogic.readouts.audit import review_record

    image = volume_from_node(volume_node)
    corrected = labels_from_segmentation(segmentation_node, volume_node, classes)
    record = {
        "source_volume": volume_node.GetName(),
        "source_segmentation": segmentation_node.GetName(),
        **(meta or {}),
    }
    if suggestion is not None:
        record.update(review_record(suggestion, corrected, image.geometry, classes))
    return image, corrected, record


def export_case_to_queue(
    queue_folder,
    volume_node,
    segmentation_node,
    classes: Sequence[dict],
    suggestion: Optional[np.ndarray] = None,
    meta: Optional[dict] = None,
    on_duplicate: str = "replace",
) -> dict:
    """Queue the reviewed case (see :func:`reviewed_case`) in a local fine-tuning queue folder."""
    from LiverSegmentationLogic.studies.case_queue import CaseQueue

    image, corrected, record = reviewed_case(volume_node, segmentation_node, classes, suggestion, meta)
    labels = {c["name"]: int(c["label"]) for c in classes}
    queue = CaseQueue(queue_folder, labels=labels, modality=(meta or {}).get("modality"))
    return queue.add(image, corrected, record, on_duplicate=on_duplicate)

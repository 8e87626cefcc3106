"""From a scan to a reviewed-ready segmentation: the local inference pipeline.

Enters: a :class:`~LiverSegmentationLogic.io.volumes.Volume` (one or more channels) and a loaded
model. Inside: preprocess (reorient to axial, resample in-plane, normalise, 2.5D neighbour stack,
pad) -> network -> postprocess (argmax, largest component, fill holes) -> back onto the input grid;
cascades crop to the first stage's region. Leaves: :class:`segmenter.SegmentationResult` (labels on
the input grid, probabilities' uncertainty), and through :mod:`pipeline` the readouts, the slices
to check first (:mod:`guidance`), the audit record and the overlay mosaic (:mod:`overlay`).
The server calls the very same :func:`pipeline.segment_case`. Builds on ``io``, ``models``, ``readouts``.
"""

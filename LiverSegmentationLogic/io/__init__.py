"""Files in, volumes out (the bottom layer).

Enters: image and label files (NIfTI, NRRD, MetaImage, a DICOM series folder), dataset folders in
nnU-Net or flat layout. Leaves: :class:`volumes.Volume` (a z, y, x array + :class:`volumes.Geometry`),
validated, and written labelmaps / ``.seg.nrrd`` files with segment metadata. Also where files live
(:mod:`locations`: the bundled ``Resources`` and the user's home) and the bundled demo case.
Imports nothing from the other stages.
"""

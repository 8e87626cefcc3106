"""LiverSegmentationLogic: the Slicer-free core of the LiverSegmentation extension.

Arrays + geometry in, arrays + geometry out. Imports numpy, torch, SimpleITK, scipy,
scikit-image and pyzmq only; never ``slicer`` or ``qt``.
"""

__version__ = "0.1.0"

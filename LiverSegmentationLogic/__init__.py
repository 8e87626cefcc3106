"""LiverSegmentationLogic: the Slicer-free core of the LiverSegmentation extension.

Arrays + geometry in, arrays + geometry out. Imports numpy, torch, SimpleITK, scipy and pyzmq
only; never ``slicer`` or ``qt``. The sub-packages follow the data flow, each importing only the
ones before it (``Testing/Python/test_layers.py`` enforces it)::

    io -> models -> readouts -> inference -> studies -> training -> remote -> cli

``errors`` (the typed exceptions) and ``processes`` (child processes) sit below them all.
"""

__version__ = "0.1.0"

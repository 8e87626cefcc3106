"""Browser review of a study (``liverseg review``): a thin trame-slicer front end on the panel's
Qt-free logic (``LiverSegmentation/LiverSegmentationLib``). Optional: ``pip install -e ".[review]"``."""

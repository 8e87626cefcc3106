"""Typed exceptions of the core. The CLI and the Slicer panel decide how to show them."""


class LiverSegError(Exception):
    """Base class of every error the core raises on purpose."""


class ImageReadError(LiverSegError):
    """The input path is missing or does not hold a readable image."""


class InvalidImageError(LiverSegError, ValueError):
    """The image was read but cannot be segmented (wrong dimension, NaN/inf, empty...)."""


class ModelNotFoundError(LiverSegError, FileNotFoundError):
    """No model (card or weights) at the given name or path."""


class ModelLoadError(LiverSegError):
    """A model exists but is corrupt or inconsistent with its card."""


class FatFractionError(LiverSegError, ValueError):
    """The fat-fraction readout cannot be computed (no overlap, unknown unit...)."""


class CancelledError(LiverSegError):
    """Long work stopped because the caller asked it to."""

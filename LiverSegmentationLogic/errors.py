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


class ProtocolError(LiverSegError):
    """A remote message is malformed (frames, JSON, dtype, shape, size)."""

    def __init__(self, message: str, request_id=None):
        super().__init__(message)
        self.request_id = request_id


class RemoteError(LiverSegError):
    """The inference server answered with an error; ``kind`` names the server-side error type."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"server error ({kind}): {message}")
        self.kind = kind
        self.message = message


class CurveKeyError(LiverSegError, ValueError):
    """CurveZMQ key files that cannot serve: one without the other, unreadable, or a public
    certificate where the secret one is needed."""


class ServerUnreachableError(LiverSegError):
    """No answer from the inference server within the timeout, after the retries."""


class ServerTimeoutError(ServerUnreachableError):
    """The server accepted a request and then stopped answering."""


class ProtocolVersionError(LiverSegError):
    """Client and server speak protocol versions that do not overlap."""


class MessageTooLargeError(LiverSegError):
    """A request is larger than the inference server accepts; it was not sent."""


class QueueError(LiverSegError, ValueError):
    """A case cannot go into the fine-tuning queue: labels or modality that do not match the
    queue, a malformed label table, or a folder that cannot be written."""

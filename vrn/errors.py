"""Exceptions with messages meant for the user: each names the file or input at fault."""


class VRNError(Exception):
    """Base class of every error vrn-edge raises on purpose."""


class WeightsError(VRNError):
    """A weights file is missing, truncated, corrupt, or does not fit the architecture."""


class ImageError(VRNError):
    """An image cannot be read or used (not an image, too small, unsupported format)."""


class NoFaceError(VRNError):
    """No face was found in an image."""


class EngineError(VRNError):
    """A TensorRT engine is missing, corrupt, or was built for another GPU or version."""


class BackendUnavailableError(VRNError):
    """An inference backend cannot run on this machine (library or device missing)."""


class UnsafePickleError(VRNError, ValueError):
    """A pickle that names a global other than NumPy's array rebuilders, holds anything
    but plain containers of arrays, numbers and strings, or is truncated or corrupt
    (also a ``ValueError``, for callers catching that)."""


class BFMNotFoundError(VRNError):
    """The BFM basis or face-region files are not available."""


class AnnotationError(VRNError):
    """A ``.mat`` file is missing or lacks the BFM fit."""


class CaptureError(VRNError):
    """A video source cannot be opened (no such camera, file or stream)."""


class UsageError(VRNError):
    """A bad combination or value of options found after parsing (exit code 2)."""


class ExportError(VRNError):
    """An export step failed its checks (parity, graph checks) or cannot run."""


class UnreadableOnnxError(VRNError):
    """An ONNX file that onnx or ONNX Runtime refuses to load; ``reason`` says which."""

    def __init__(self, message: str, reason: str = "ONNX Runtime cannot load it"):
        super().__init__(message)
        self.reason = reason

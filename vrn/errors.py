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

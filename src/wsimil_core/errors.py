"""Errors raised for bad user input. Each carries one clear line naming the file and the problem.

The CLI prints ``str(error)`` as a single line (no traceback unless ``--debug``).
"""


class WsimilError(Exception):
    """Base class of every error that is the user's input, not a bug."""


class SlideError(WsimilError):
    """A slide cannot be opened or read (missing, unsupported, corrupt, no mpp)."""


class StoreError(WsimilError):
    """The feature store is missing, incomplete, or written by another encoder."""


class ConfigError(WsimilError):
    """A configuration file or option is invalid (unknown key, wrong type, bad value)."""


class DataError(WsimilError):
    """Labels, omics tables or bags are inconsistent (missing slides, NaNs, dimension mismatch)."""


class CheckpointError(WsimilError):
    """A checkpoint file is missing, corrupt, or does not match the data."""


class LockError(WsimilError):
    """A run folder or feature store is locked by another process (the message names it)."""

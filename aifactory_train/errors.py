"""Errors that users can fix themselves.

Each message names the file, field or key, the bad value and what would be valid. The CLI prints
them without a traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""


class AiftError(Exception):
    """Base class of the errors that ``aift`` reports as a plain message."""


class ConfigError(AiftError):
    """A config key has a bad value, type or name."""


class DataError(AiftError):
    """Input data is missing, empty, unreadable or inconsistent."""


class TrackingError(AiftError):
    """The tracking store cannot be reached or written."""


class CheckpointError(AiftError):
    """A checkpoint does not exist or does not fit the data/model."""


class ReleaseRefused(AiftError):
    """`aift export` checked the exported model and will not release it (parity or disclosure failed)."""

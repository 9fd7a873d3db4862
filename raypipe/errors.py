"""The errors raypipe raises for bad input. Each names the key, file or URI at fault; the command
line prints one line for any of them (exit 2) instead of a traceback."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type or out of range, or a config file is unreadable."""


class StorageError(ConfigError):
    """A storage location is unusable: bad URI, missing bucket or credentials, missing object."""


class DataError(ValueError):
    """The data set's layout is unusable (missing path, empty split, class mismatch...)."""


class CheckpointError(RuntimeError):
    """A checkpoint or exported model file is unusable (torn, other format, other architecture)."""


USER_ERRORS = (ConfigError, DataError, CheckpointError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError)   # what a command reports as one line; the OSErrors name their path

"""Errors a user can act on: the CLI prints them as one line, without a traceback."""


class QtuneError(Exception):
    """Base class for errors caused by input (files, options, data), not by a bug."""


class DataError(QtuneError):
    """A dataset, list file or image that cannot be used as given."""


class WeightsError(QtuneError):
    """A weights file that is missing, unreadable or of another architecture."""


class CheckpointError(QtuneError):
    """An adapter checkpoint that is missing, corrupt or made for another backbone."""


class ConfigError(QtuneError):
    """An unknown method, option or out-of-range value."""


class TrainingError(QtuneError):
    """A run that cannot go on as configured: its loss stopped being finite (diverged)."""


class TrialsFailedError(QtuneError):
    """A sweep that ran to its end with failed trials (recorded in its store; a rerun retries them)."""

    def __init__(self, message: str, spec_hash: str):
        super().__init__(message)
        self.spec_hash = spec_hash


class FolderLockedError(QtuneError):
    """An output folder that another live qtune process is writing."""


class CacheError(QtuneError):
    """A TapCache folder that is not a cache, or cannot be built or read as asked."""


class CacheIncompleteError(CacheError):
    """A cache whose build has not finished (interrupted, or still running): never read as complete."""


class CacheCorruptError(CacheError):
    """A cache file that is truncated or fails its per-chunk checksum."""


class CacheStaleError(CacheError):
    """A cache made from other data or other backbone weights than those it is checked against."""

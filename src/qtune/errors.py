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

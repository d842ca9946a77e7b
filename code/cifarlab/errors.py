"""Errors a user can cause. The CLI prints them as one line ``error: ...`` and exits 2."""


class CifarlabError(Exception):
    """Base class: bad input, missing data, unusable checkpoint, refused overwrite."""


class ConfigError(CifarlabError):
    """An invalid option value or combination."""


class DatasetError(CifarlabError):
    """A dataset that cannot be found, read or downloaded."""


class CheckpointError(CifarlabError):
    """A missing, truncated or foreign checkpoint."""


class RunDirError(CifarlabError):
    """A run directory that would be overwritten, or is missing for --resume."""

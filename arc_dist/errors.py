"""The project's own error types: every user-facing failure is one of these, with a message naming the fix."""


class ArcError(Exception):
    """Base class for errors the user can act on (bad config, bad data, missing files)."""


class ConfigError(ArcError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(ArcError):
    """Input data (corpus shards, GLUE files) is missing, empty, corrupt or does not match the model."""

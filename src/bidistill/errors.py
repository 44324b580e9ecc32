"""Error types for bad input. The CLI prints these as one message, without a traceback."""


class BidistillError(Exception):
    """Base of every error caused by the user's files or settings (not by a bug)."""


class ConfigError(BidistillError, ValueError):
    """A config file that cannot be used; the message names the file and the key."""


class CohortError(BidistillError, ValueError):
    """A cohort table that cannot be used; the message names the file, row, column and value."""


class FeatureFileError(BidistillError, ValueError):
    """A feature file that breaks the contract; the message names the file."""


class SlideError(BidistillError, OSError):
    """A slide that cannot be read; the message names the file and the reason."""


class CheckpointError(BidistillError):
    """A trained-method folder that cannot be loaded; the message names the file."""

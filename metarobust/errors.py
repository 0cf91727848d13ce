"""Exceptions raised on bad input, before any work starts.

Every message names the field that is wrong, the value given, and what would be accepted.
"""

from __future__ import annotations


class MetarobustError(Exception):
    """Base class of every error metarobust raises on purpose."""


class ConfigError(MetarobustError, ValueError):
    """A configuration value (from YAML, an override or a constructor) is invalid."""


class DataError(MetarobustError, ValueError):
    """A dataset file is missing or corrupt, or an episode cannot be drawn from it."""


class TrainingDiverged(MetarobustError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class ConfigWarning(UserWarning):
    """A config that is valid but likely not what was meant (e.g. an empty config file: every
    default applies)."""

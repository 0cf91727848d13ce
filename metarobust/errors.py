"""Exceptions raised on bad input, before any work starts.

Every message names the field that is wrong, the value given, and what would be accepted.
"""

from __future__ import annotations


class MetarobustError(Exception):
    """Base class of every error metarobust raises on purpose."""

    exit_code = 2
    """What the ``metarobust`` command exits with on this error."""


class ConfigError(MetarobustError, ValueError):
    """A configuration value (from YAML, an override or a constructor) is invalid."""


class DataError(MetarobustError, ValueError):
    """A dataset file is missing or corrupt, or an episode cannot be drawn from it."""


class TrainingDiverged(MetarobustError, RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class MaskingCheckFailed(MetarobustError, RuntimeError):
    """A gradient-masking check failed under ``eval.strict=true``: the robust accuracy is not
    trustworthy. The results are written before it is raised."""

    exit_code = 3

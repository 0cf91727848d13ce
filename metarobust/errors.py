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
    """The training loss became NaN or infinite; the last good checkpoint is kept.

    ``checkpoint_step``: the step of that checkpoint (``None``: none was written yet, start again
    without ``--resume``); ``advice``: overrides that follow the message's advice
    (``["optim.lr=0.0001"]``)."""

    def __init__(self, message: str, checkpoint_step: int | None = None, advice: list[str] | None = None) -> None:
        super().__init__(message)
        self.checkpoint_step, self.advice = checkpoint_step, list(advice or [])


class TrainingInterrupted(MetarobustError, KeyboardInterrupt):
    """Training was stopped by Ctrl-C (SIGINT) after a checkpoint was written; ``--resume`` continues."""

    exit_code = 130  # the shell's code for SIGINT


class MaskingCheckFailed(MetarobustError, RuntimeError):
    """A gradient-masking check failed under ``eval.strict=true``: the robust accuracy is not
    trustworthy. The results are written before it is raised."""

    exit_code = 3


class ConfigWarning(UserWarning):
    """A config that is valid but likely not what was meant (e.g. an empty config file: every
    default applies)."""

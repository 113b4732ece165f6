"""Exception types. `BadInputError` and its subclasses map to exit code 2 on the CLI."""

from __future__ import annotations


class ModelpressError(Exception):
    """Base class for every error modelpress raises on purpose."""


class BadInputError(ModelpressError, ValueError):
    """The user gave a value modelpress cannot use; the message names it and what is allowed."""


class ConfigError(BadInputError):
    """A config or recipe field is unknown or has a bad value."""


class UnknownConfigError(ConfigError):
    """No handler is registered for a config type."""


class ModelLoadError(BadInputError):
    """A model spec cannot be resolved or its file cannot be read."""


class UntrustedCodeError(ModelLoadError):
    """A file would run code when loaded (a pickle, a .pt2, TorchScript, custom model code) and the
    user did not allow it (`--trust-code`, `trust_code=True`); see `modelpress.trust`."""


class UnsafePickleError(UntrustedCodeError):
    """A file needs arbitrary pickle loading and the user did not allow it (an `UntrustedCodeError`)."""


class DataError(BadInputError):
    """An evaluation or calibration data set is missing or malformed."""


class NotAvailableError(ModelpressError):
    """A command or feature that is not part of this release yet."""

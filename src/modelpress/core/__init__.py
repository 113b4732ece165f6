"""Core abstractions shared by every pass: configs, registry, context, report, errors, module-tree helpers."""

from modelpress.core.config import Config, config_type
from modelpress.core.context import Context
from modelpress.core.errors import (
    BadInputError,
    ConfigError,
    DataError,
    ModelLoadError,
    ModelpressError,
    NotAvailableError,
    UnknownConfigError,
    UnsafePickleError,
    UntrustedCodeError,
)
from modelpress.core.modules import set_submodule
from modelpress.core.options import RunOptions, default_cache_dir
from modelpress.core.registry import PASSES, Registry, apply, register
from modelpress.core.report import Latency, ModelStats, PassRecord, Quality, Report

__all__ = [
    "Config",
    "config_type",
    "Context",
    "RunOptions",
    "default_cache_dir",
    "Registry",
    "PASSES",
    "register",
    "apply",
    "set_submodule",
    "Report",
    "ModelStats",
    "Latency",
    "Quality",
    "PassRecord",
    "ModelpressError",
    "BadInputError",
    "ConfigError",
    "UnknownConfigError",
    "ModelLoadError",
    "UnsafePickleError",
    "UntrustedCodeError",
    "DataError",
    "NotAvailableError",
]

"""The package version, in a module of its own: `modelpress.__version__` and the output marker read it,
and importing it runs nothing else (the root package stays lazy, `core` needs nothing above it)."""

__version__ = "0.1.0"

"""The package's version, in a module of its own so that a node can say it without importing
the API (the package's `__init__` does)."""

__version__ = "0.1.0"

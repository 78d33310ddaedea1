"""The version of resflow, stated once (the package metadata is taken from here)."""

__version__ = "0.2.0"

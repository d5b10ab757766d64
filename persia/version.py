"""persia's version (PERSIA's module path ``persia.version``)."""

__version__ = "0.1.0"

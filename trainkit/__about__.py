"""The version, importable without torch (``trainkit --version`` must stay instant)."""

__version__ = "0.1.0"

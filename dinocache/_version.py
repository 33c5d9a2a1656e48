"""The tool's version, in a module of its own so that every module can name it without
importing the package (whose `__init__` imports the reader on first use)."""

__version__ = "0.2.0"

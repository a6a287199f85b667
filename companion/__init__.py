"""companion: a terminal voice companion built on Sesame CSM-1B."""

__version__ = "0.1.0"

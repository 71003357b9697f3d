"""lookalike: visual product search over a store's catalog."""

__version__ = "0.1.0"

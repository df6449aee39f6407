"""Drop-in modules: each wraps one functional op and converts from the standard torch module."""
from .int4_linear import Int4Linear

__all__ = ["Int4Linear"]

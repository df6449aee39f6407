"""Drop-in modules: each wraps one functional op and converts from the standard torch module."""
from .int4_linear import Int4Linear
from .multihead_attention import MultiheadAttention
from .sparse24_int4_linear import Sparse24Int4Linear
from .sparse24_linear import Sparse24Linear
from .w4a8_linear import W4A8Linear

__all__ = ["Int4Linear", "MultiheadAttention", "Sparse24Linear", "Sparse24Int4Linear", "W4A8Linear"]

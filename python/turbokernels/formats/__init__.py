"""Compressed weight formats (what the kernels read)."""
from .int4 import Int4Weight, pack_int4, quantize_int4, unpack_int4
from .sparse24 import Sparse24Weight
from .sparse24_int4 import Sparse24Int4Weight

__all__ = ["Int4Weight", "quantize_int4", "pack_int4", "unpack_int4", "Sparse24Weight", "Sparse24Int4Weight"]

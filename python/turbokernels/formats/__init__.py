from .int4 import Int4Weight, quantize_int4, pack_int4, unpack_int4

__all__ = ["Int4Weight", "quantize_int4", "pack_int4", "unpack_int4"]
from .sparse24 import Sparse24Weight  # noqa: E402
__all__ += ["Sparse24Weight"]
from .sparse24_int4 import Sparse24Int4Weight  # noqa: E402
__all__ += ["Sparse24Int4Weight"]

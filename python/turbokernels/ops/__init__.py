"""torch.ops.turbokernels.*: one module per op (schema, fake, backend table, autograd, functional entry)."""
from . import int4_mm  # noqa: F401  (defines torch.ops.turbokernels.int4_mm)
from .int4_mm import int4_linear
from .attention import attention  # defines torch.ops.turbokernels.attention_fwd / attention_bwd
from .decode_attention import decode_attention, kv_cache_append

__all__ = ["int4_linear", "attention"]
__all__ += ["decode_attention", "kv_cache_append"]
from .sparse24_mm import sparse24_linear  # defines torch.ops.turbokernels.sparse24_mm
__all__ += ["sparse24_linear"]
from .sparse24_int4_mm import sparse24_int4_linear  # defines torch.ops.turbokernels.sparse24_int4_mm
__all__ += ["sparse24_int4_linear"]

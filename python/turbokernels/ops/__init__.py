"""torch.ops.turbokernels.*: one module per op (schema, fake, backend table, autograd, functional entry).
Importing a module defines its ops."""
from .int4_mm import int4_linear                      # int4_mm
from .attention import attention                      # attention_fwd, attention_bwd
from .decode_attention import decode_attention, kv_cache_append
from .sparse24_mm import sparse24_linear              # sparse24_mm
from .sparse24_int4_mm import sparse24_int4_linear    # sparse24_int4_mm
from .w4a8_mm import w4a8_linear                      # w4a8_mm

__all__ = ["int4_linear", "attention", "decode_attention", "kv_cache_append", "sparse24_linear",
           "sparse24_int4_linear", "w4a8_linear"]

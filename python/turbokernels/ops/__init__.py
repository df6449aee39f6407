"""torch.ops.turbokernels.*: one module per op (schema, fake, backend table, autograd, functional entry)."""
from . import int4_mm  # noqa: F401  (defines torch.ops.turbokernels.int4_mm)
from .int4_mm import int4_linear

__all__ = ["int4_linear"]

"""turbokernels: Triton and C++/CUDA kernels for faster transformer inference, as torch ops and drop-in modules.

    import turbokernels as tk
    w = tk.quantize_int4(linear.weight, group_size=128)      # Int4Weight
    y = tk.int4_linear(x, w, linear.bias)                     # torch.ops.turbokernels.int4_mm underneath
    layer = tk.nn.Int4Linear.from_linear(linear)              # drop-in module
    with tk.backend("reference"): ...                         # force a backend: reference/triton/cpu/cuda
"""
from . import backends, ops  # noqa: F401  (ops registers torch.ops.turbokernels.*)
from .backends import BackendUnavailable, backend, set_backend
from .formats import Int4Weight, quantize_int4
from .ops import int4_linear
from . import nn  # noqa: E402

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "backend", "set_backend", "backends", "Int4Weight", "quantize_int4",
           "int4_linear", "nn", "__version__"]

"""turbokernels: Triton and C++/CUDA kernels for faster transformer inference, as torch ops and drop-in modules.

    import turbokernels as tk
    w = tk.quantize_int4(linear.weight, group_size=128)      # Int4Weight
    y = tk.int4_linear(x, w, linear.bias)                     # torch.ops.turbokernels.int4_mm underneath
    o = tk.attention(q, k, v, causal=True)                    # FlashAttention layout (batch, seqlen, heads, dim)
    y = tk.sparse24_linear(x, tk.Sparse24Weight.from_dense(tk.prune_24(w)))   # 2:4 sparse GEMM
    layer = tk.nn.Int4Linear.from_linear(linear)              # drop-in module
    with tk.backend("reference"): ...                         # force a backend: reference/triton/cpu/cuda
    report = tk.optimize(model, int4=True)                    # a whole model in place; tk.restore(model) undoes it
    parallelize_module(model, mesh, tk.parallel.tp_plan(model))  # tensor parallel, torch.distributed's engine
    model, report = tk.load_quantized("llama-gptq/")          # a GPTQ / AWQ / compressed-tensors folder, int4
"""
from ._unshadow import unshadow_hf_kernels as _unshadow_hf_kernels

_unshadow_hf_kernels()  # before anything imports transformers: see _unshadow.py
from . import backends, ops  # noqa: F401,E402  (ops registers torch.ops.turbokernels.*)
from .backends import BackendUnavailable, backend, set_backend
from .compress import is_24_sparse, prune_24
from .formats import Int4Weight, Sparse24Int4Weight, Sparse24Weight, quantize_int4
from .integrations.sdpa import scaled_dot_product_attention
from .ops import (attention, decode_attention, int4_linear, kv_cache_append, sparse24_int4_linear,
                  sparse24_linear, w4a8_linear)
from . import model, nn  # noqa: E402
from .model import optimize, restore  # noqa: E402
from .checkpoint import from_pretrained, save_pretrained  # noqa: E402
from .hf_import import load_quantized  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "parallel":  # tensor parallelism: imports torch.distributed.tensor, so only when asked for
        import importlib
        return importlib.import_module(".parallel", __name__)
    raise AttributeError(f"module 'turbokernels' has no attribute {name!r}")


__all__ = ["BackendUnavailable", "backend", "set_backend", "backends", "__version__",
           "Int4Weight", "quantize_int4", "int4_linear", "w4a8_linear",
           "attention", "scaled_dot_product_attention", "decode_attention", "kv_cache_append",
           "prune_24", "is_24_sparse", "Sparse24Weight", "sparse24_linear", "Sparse24Int4Weight",
           "sparse24_int4_linear", "model", "nn", "optimize", "restore", "save_pretrained", "from_pretrained",
           "load_quantized"]

"""Shared helpers for the int4 tests: build a weight, the float64 golden result and torch's same-dtype baseline."""
import torch

import turbokernels as tk
from turbokernels import backends
from turbokernels.reference.int4_mm import dequantize_int4
from turbokernels.testing import int4_dequant_magnitudes, matmul_allowance, operand_dtype


def make_weight(N, K, group_size=128, symmetric=False, dtype=torch.float16):
    w = torch.randn(N, K, dtype=torch.float32).to(dtype)
    return tk.quantize_int4(w, group_size=group_size, symmetric=symmetric)


def auto_backend(x, weight: tk.Int4Weight, bias=None) -> str:
    """The backend int4_linear(x, weight, bias) dispatches to here (outside any `with tk.backend(...)`)."""
    x2 = x.reshape(-1, x.shape[-1])
    args = (x2, weight.qweight, weight.scales, weight.offsets, weight.effective_group_size, bias)
    return backends.select("int4_mm", *args)[0]


def allowance(x, weight: tk.Int4Weight, backend: str = None, bias=None):
    """For assert_close(allowance=...): what int4_mm on `backend` (None: the one the automatic dispatch picks) may add before rounding its output: the fp32
    roundings of its own dequantization (int4_dequant_magnitudes) and, on the Triton/CUDA kernels, the rounding of
    the dequantized weight to x's dtype for the tensor-core dot."""
    backend = backend or auto_backend(x, weight, bias)
    xs = x if weight.perm is None else x.index_select(-1, weight.perm)
    args = (weight.qweight, weight.scales, weight.offsets, weight.effective_group_size, weight.in_features)
    return matmul_allowance(xs, dequantize_int4(*args, dtype=torch.float64), bias=bias,
                            operand_dtype=operand_dtype(backend, x.dtype, "int4_mm"),
                            dequant_magnitudes=int4_dequant_magnitudes(weight, backend))


def golden_and_baseline(x, weight: tk.Int4Weight, bias=None):
    """(float64 golden: the exact q * scale + offset weight; torch in x's dtype: dequantize to x.dtype, then
    matmul), both (..., N)."""
    args = (weight.qweight, weight.scales, weight.offsets, weight.effective_group_size, weight.in_features)
    xs = x if weight.perm is None else x.index_select(-1, weight.perm)
    golden = xs.double() @ dequantize_int4(*args, dtype=torch.float64)
    baseline = xs @ dequantize_int4(*args).to(x.dtype)
    if bias is not None:
        golden = golden + bias.double()
        baseline = baseline + bias
    return golden, baseline

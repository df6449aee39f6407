"""Shared helpers for the int4 tests: build a weight, the float64 golden result and torch's same-dtype baseline."""
import torch

import turbokernels as tk
from turbokernels.reference.int4_mm import dequantize_int4
from turbokernels.testing import matmul_allowance, operand_dtype


def make_weight(N, K, group_size=128, symmetric=False, dtype=torch.float16):
    w = torch.randn(N, K, dtype=torch.float32).to(dtype)
    return tk.quantize_int4(w, group_size=group_size, symmetric=symmetric)


def allowance(x, weight: tk.Int4Weight, backend: str = "reference", bias=None):
    """For assert_close(allowance=...): what int4_mm on `backend` may add before rounding its output (the
    Triton/CUDA kernels round the dequantized weight to x's dtype for the tensor-core dot)."""
    xs = x if weight.perm is None else x.index_select(-1, weight.perm)
    args = (weight.qweight, weight.scales, weight.offsets, weight.effective_group_size, weight.in_features)
    return matmul_allowance(xs, dequantize_int4(*args, dtype=torch.float64), bias=bias,
                            operand_dtype=operand_dtype(backend, x.dtype))


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

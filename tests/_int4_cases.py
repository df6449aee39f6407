"""Shared helpers for the int4 tests: build a weight, the float64 golden result and torch's same-dtype baseline."""
import torch

import turbokernels as tk
from turbokernels.reference.int4_mm import dequantize_int4


def make_weight(N, K, group_size=128, symmetric=False, dtype=torch.float16):
    w = torch.randn(N, K, dtype=torch.float32).to(dtype)
    return tk.quantize_int4(w, group_size=group_size, symmetric=symmetric)


def golden_and_baseline(x, weight: tk.Int4Weight, bias=None):
    """(float64 golden, torch in x's dtype: dequantize to x.dtype then F.linear), both (..., N)."""
    w_kn = dequantize_int4(weight.qweight, weight.scales, weight.offsets, weight.effective_group_size,
                           weight.in_features)  # exact in fp32
    xs = x if weight.perm is None else x.index_select(-1, weight.perm)
    golden = xs.double() @ w_kn.double()
    baseline = xs @ w_kn.to(x.dtype)
    if bias is not None:
        golden = golden + bias.double()
        baseline = baseline + bias
    return golden, baseline

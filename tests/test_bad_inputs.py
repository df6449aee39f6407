"""Every public entry against bad (and odd but legal) input, table-driven.

For each entry (the functional ops, the SDPA drop-in, pruning, the formats' constructors and importers, the nn
modules, load_state_dict, the model swaps, the CLI) a table of cases `Case(id, category, build, expect)`:

    build()    makes the call: a `Call(fn, check, after)`; fn() runs the entry
    expect     OK: the call works and check(result, backend) compares it with the reference (the float64 golden
               with turbokernels.testing's allowance, torch's own function, or an exact equality where the result
               is exact), NaN/Inf included: they must appear exactly where the golden result has them;
               or (ExceptionType, regex): the call raises that, and the regex names the entry and the argument
               (`int4_linear\\(bias\\)`), in the package's style `entry(argument): expected ..., got ...`
    after()    runs after either outcome: "nothing is left half-changed" (the caches, the module, the model)

Categories: dtype, mixed (dtypes), device (meta; cuda ones skip without a GPU, no-CUDA ones skip with one), shape
(rank/shape), empty (zero-size dims), view (non-contiguous, transposed, sliced, storage offset, expanded), nonfinite
(NaN/Inf), int32 (sizes whose offsets pass 2^31: meta tensors or expand()ed views, nothing big is allocated),
cu_seqlens, block_table, capacity (cache lengths), value (other invalid values), type (not a tensor), atomic (a
failure leaves nothing half-changed).

Every case runs on every backend of its entry that can run here (reference, cpu, triton under TRITON_INTERPRET=1).

`python tests/test_bad_inputs.py --counts` prints the per-entry counts (the table in docs/reliability.md).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import os
import sys
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import turbokernels as tk
from turbokernels import backends as tk_backends
from turbokernels import model as tk_model
from turbokernels.reference import attention as ref_attention
from turbokernels.reference import decode_attention as ref_decode
from turbokernels.testing import (Allowance, assert_close, attention_allowance, decode_allowance, exp_error,
                                  matmul_allowance,
                                  operand_dtype)

import int4_packers as P
from _int4_cases import make_weight

OK = "ok"
HAS_CUDA = torch.cuda.is_available()
CATEGORIES = ("dtype", "mixed", "device", "shape", "empty", "view", "nonfinite", "int32", "cu_seqlens", "block_table",
              "capacity", "value", "type", "atomic")
BIG = 2 ** 31  # the first element offset a 32-bit index cannot hold
NO_CUDA = r"device='cuda' requested but torch.cuda.is_available\(\) is False"


# ---- the table's types ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Call:
    fn: Callable[[], Any]
    check: Optional[Callable[[Any, Optional[str]], None]] = None  # (result, backend) -> asserts
    after: Optional[Callable[[], None]] = None                      # runs after either outcome


@dataclasses.dataclass
class Case:
    id: str
    category: str
    build: Callable[[], Call]
    expect: Any                               # OK or (exception type, regex)
    requires: Optional[str] = None            # "cuda" | "nocuda"
    backends: Optional[tuple] = None          # overrides the entry's backends
    xfail: Optional[dict] = None              # {backend: reason}: a known divergence, pinned (strict)


@dataclasses.dataclass
class Entry:
    name: str
    cases: list
    backends: tuple = (None,)                 # None: no backend to choose (or the automatic choice)
    unchanged: str = ""                       # what every case's after() checks is unchanged (for the counts)


def ok(id_, category, build, **kw) -> Case:
    assert category in CATEGORIES, category
    return Case(id_, category, build, OK, **kw)


def bad(id_, category, build, exc, regex, **kw) -> Case:
    assert category in CATEGORIES, category
    return Case(id_, category, build, (exc, regex), **kw)


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaN included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(bits), b.contiguous().view(bits))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _backend_skip(backend: Optional[str]) -> Optional[str]:
    """Why `backend` cannot run this battery's CPU tensors here (None: it can)."""
    if backend == "triton" and not _interpreting():
        return "triton runs CPU tensors only under TRITON_INTERPRET=1"
    if backend == "cpu" and tk_backends.check_extension_op("int4_mm", "cpu")(torch.empty(1)) is not None:
        return "turbokernels._C is not built"
    return None


# ---- checks against the reference -------------------------------------------------------------------------------
def assert_matches(ours: torch.Tensor, golden: torch.Tensor, allowance: Optional[Allowance] = None, what: str = ""):
    """testing.assert_close where the golden result is finite; non-finite exactly where the golden is, and the same
    +-Inf wherever both are infinite. Which of NaN and +-Inf an Inf input produces is the kernel's summation form
    (Inf times a pruned zero is NaN in a dense product and never happens in a kernel that skips the zeros; an int4
    kernel that factors a group as scale * sum(x q) + offset * sum(x) meets Inf - Inf): both say "not a number you
    can use", so the spec fixes where the output is non-finite, not which non-finite value it is."""
    assert isinstance(ours, torch.Tensor), f"{what}: got {type(ours).__name__}"
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(golden.shape)}"
    golden = golden.to(torch.float64)
    finite = torch.isfinite(golden)
    assert torch.equal(torch.isfinite(ours), finite), \
        f"{what}: {int((~torch.isfinite(ours)).sum())} non-finite elements, the reference has {int((~finite).sum())}"
    both_inf = torch.isinf(golden) & torch.isinf(ours)
    assert torch.equal(ours.to(torch.float64)[both_inf], golden[both_inf]), f"{what}: an Inf of the wrong sign"
    if allowance is not None:
        allowance = allowance.map(lambda t: t.expand_as(golden)[finite] if t.dim() else t)
    assert_close(ours[finite], golden[finite], allowance=allowance, what=what)


def assert_meta_like(out: torch.Tensor, shape, dtype):
    assert out.device.type == "meta" and tuple(out.shape) == tuple(shape) and out.dtype == dtype, \
        (out.device, tuple(out.shape), out.dtype, tuple(shape), dtype)


def _opd(backend, dtype):
    return operand_dtype(backend or "reference", dtype)


def _expe(backend, dtype):
    return exp_error(backend or "reference", dtype)


# ---- linear ops ---------------------------------------------------------------------------------------------------
N, K = 24, 64


def _linear_check(entry, x, w64_fn, bias, operand: bool):
    """x (..., K) @ w64 (N, K) + bias in float64; the operand rounding of the kernel's dot when `operand`."""
    def check(out, backend):
        if x.device.type == "meta":
            return assert_meta_like(out, x.shape[:-1] + (N if w64_fn is None else w64_fn().shape[0],), x.dtype)
        w64 = w64_fn()
        golden = x.double() @ w64.t()
        if bias is not None:
            golden = golden + bias.double()
        allowance = matmul_allowance(x, w64.t(), bias=bias,
                                     operand_dtype=_opd(backend, x.dtype) if operand else None)
        assert out.dtype == x.dtype
        assert_matches(out, golden, allowance, what=f"{entry} {backend}")
    return check


def int4_call(x=None, w=None, bias=None) -> Call:
    x = torch.randn(3, K) if x is None else x
    w = make_weight(N, K, 32) if w is None else w
    w64 = (lambda: w.dequantize(torch.float64)) if w.device.type != "meta" else None
    return Call(lambda: tk.int4_linear(x, w, bias), _linear_check("int4_linear", x, w64, bias, True))


def _nan_scale_weight():
    w = make_weight(N, K, 32)
    w.scales[1, 5] = float("nan")
    return w


def _act_order_weight():
    w = make_weight(N, K, 32)
    perm = torch.randperm(K)
    return tk.Int4Weight(w.qweight, w.scales, w.offsets, 32, K, perm=perm)


INT4_LINEAR = [
    ok("fp32", "dtype", lambda: int4_call()),
    ok("fp16", "dtype", lambda: int4_call(torch.randn(3, K).half())),
    ok("bf16", "dtype", lambda: int4_call(torch.randn(3, K).bfloat16())),
    bad("x_float64", "dtype", lambda: int4_call(torch.randn(3, K, dtype=torch.float64)), TypeError,
        r"int4_linear\(x\): dtype must be float16, bfloat16 or float32, got torch.float64"),
    bad("x_int32", "dtype", lambda: int4_call(torch.ones(3, K, dtype=torch.int32)),
        TypeError, r"int4_linear\(x\): dtype"),
    bad("x_bool", "dtype", lambda: int4_call(torch.ones(3, K, dtype=torch.bool)),
        TypeError, r"int4_linear\(x\): dtype"),
    bad("bias_int", "dtype", lambda: int4_call(bias=torch.ones(N, dtype=torch.int64)), TypeError,
        r"int4_linear\(bias\): dtype"),
    ok("x_fp32_scales_fp16", "mixed", lambda: int4_call(torch.randn(3, K), make_weight(N, K, 32, dtype=torch.float16))),
    ok("x_fp16_scales_fp32", "mixed", lambda: int4_call(torch.randn(3, K).half(),
                                                        make_weight(N, K, 32, dtype=torch.float32))),
    bad("bias_fp16_x_fp32", "mixed", lambda: int4_call(bias=torch.randn(N).half()), TypeError,
        r"int4_linear\(bias\): dtype torch.float16 does not match x's torch.float32"),
    bad("bias_bf16_x_fp16", "mixed", lambda: int4_call(torch.randn(3, K).half(), bias=torch.randn(N).bfloat16()),
        TypeError, r"int4_linear\(bias\): dtype"),
    bad("x_meta", "device", lambda: int4_call(torch.randn(3, K, device="meta")), ValueError,
        r"int4_linear\(x\): x is on meta but the weight is on cpu"),
    bad("bias_meta", "device", lambda: int4_call(bias=torch.randn(N, device="meta")), ValueError,
        r"int4_linear\(bias\): bias is on meta but x is on cpu"),
    bad("x_cuda_weight_cpu", "device", lambda: int4_call(torch.randn(3, K, device="cuda")), ValueError,
        r"int4_linear\(x\): x is on cuda:0 but the weight is on cpu", requires="cuda"),
    ok("all_meta", "device", lambda: int4_call(torch.randn(3, K, device="meta"), make_weight(N, K, 32).to("meta"))),
    bad("x_last_dim", "shape", lambda: int4_call(torch.randn(3, K - 1)), ValueError,
        r"int4_linear\(x\): last dimension must be in_features=64, got shape \(3, 63\)"),
    bad("x_0d", "shape", lambda: int4_call(torch.tensor(1.0)), ValueError, r"int4_linear\(x\): last dimension"),
    bad("bias_shape", "shape", lambda: int4_call(bias=torch.randn(N - 1)), ValueError,
        r"int4_linear\(bias\): expected shape \(24,\), got \(23,\)"),
    bad("bias_2d", "shape", lambda: int4_call(bias=torch.randn(1, N)),
        ValueError, r"int4_linear\(bias\): expected shape"),
    ok("x_1d", "shape", lambda: int4_call(torch.randn(K))),
    ok("x_4d", "shape", lambda: int4_call(torch.randn(2, 1, 3, K))),
    ok("act_order", "shape", lambda: int4_call(w=_act_order_weight())),
    ok("rows_0", "empty", lambda: int4_call(torch.randn(0, K))),
    ok("batch_0", "empty", lambda: int4_call(torch.randn(2, 0, K))),
    ok("out_features_0", "empty", lambda: int4_call(w=tk.Int4Weight(torch.zeros(K // 8, 0, dtype=torch.int32),
                                                                     torch.ones(2, 0), torch.zeros(2, 0), 32, K))),
    ok("x_transposed", "view", lambda: int4_call(torch.randn(K, 3).t())),
    ok("x_sliced_k", "view", lambda: int4_call(torch.randn(3, 2 * K)[:, ::2])),
    ok("x_storage_offset", "view", lambda: int4_call(torch.randn(4, K)[1:])),
    ok("x_expanded", "view", lambda: int4_call(torch.randn(1, K).expand(3, K))),
    ok("x_permuted_3d", "view", lambda: int4_call(torch.randn(3, 2, K).transpose(0, 1))),
    ok("bias_strided", "view", lambda: int4_call(bias=torch.randn(2 * N)[::2])),
    ok("x_nan_row", "nonfinite", lambda: int4_call(torch.randn(3, K).index_fill_(0, torch.tensor([1]), float("nan")))),
    ok("x_inf", "nonfinite", lambda: int4_call(torch.randn(3, K).index_put_((torch.tensor([2]), torch.tensor([7])),
                                                                             torch.tensor(float("inf"))))),
    ok("bias_nan_inf", "nonfinite", lambda: int4_call(bias=torch.randn(N).index_put_(
        (torch.tensor([0, 3]),), torch.tensor([float("nan"), float("-inf")])))),
    ok("scale_nan", "nonfinite", lambda: int4_call(w=_nan_scale_weight())),
    ok("meta_rows_past_2^31", "int32", lambda: int4_call(torch.empty(BIG // K + 1, K, device="meta"),
                                                          make_weight(N, K, 32).to("meta"))),
    bad("triton_out_past_2^31", "int32", lambda: int4_call(torch.randn(1, K).expand(BIG // N + 1, K)),
        tk.BackendUnavailable, r"int4_mm.*'triton'.*out.*2\^31", backends=("triton",)),
    bad("x_list", "type", lambda: int4_call([1.0] * K), TypeError, r"int4_linear\(x\): expected a torch.Tensor"),
    bad("weight_tensor", "type", lambda: int4_call(w=torch.randn(N, K)), TypeError,
        r"int4_linear\(weight\): expected a turbokernels.Int4Weight"),
    bad("bias_list", "type", lambda: int4_call(bias=[0.0] * N),
        TypeError, r"int4_linear\(bias\): expected a torch.Tensor"),
]


def sparse_weight(dtype=torch.float32, n=N, k=K):
    return tk.Sparse24Weight.from_dense(tk.prune_24(torch.randn(n, k)).to(dtype))


def sparse24_call(x=None, w=None, bias=None) -> Call:
    x = torch.randn(3, K) if x is None else x
    w = sparse_weight(x.dtype if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32) \
        if w is None else w
    w64 = (lambda: w.to_dense(torch.float64)) if w.device.type != "meta" else None
    return Call(lambda: tk.sparse24_linear(x, w, bias), _linear_check("sparse24_linear", x, w64, bias, False))


def _sparse_nan_weight():
    d = tk.prune_24(torch.randn(N, K))
    d[2, d[2].nonzero()[0, 0]] = float("nan")
    return tk.Sparse24Weight.from_dense(d)


SPARSE24_LINEAR = [
    ok("fp32", "dtype", lambda: sparse24_call()),
    ok("fp16", "dtype", lambda: sparse24_call(torch.randn(3, K).half())),
    ok("bf16", "dtype", lambda: sparse24_call(torch.randn(3, K).bfloat16())),
    bad("x_float64", "dtype", lambda: sparse24_call(torch.randn(3, K, dtype=torch.float64)), TypeError,
        r"sparse24_linear\(x\): dtype must be float16, bfloat16 or float32"),
    bad("x_int", "dtype", lambda: sparse24_call(torch.ones(3, K, dtype=torch.int64)), TypeError,
        r"sparse24_linear\(x\): dtype"),
    bad("x_fp16_weight_fp32", "mixed", lambda: sparse24_call(torch.randn(3, K).half(), sparse_weight()), TypeError,
        r"sparse24_linear\(x\): dtype torch.float16 does not match the weight's values dtype torch.float32"),
    bad("bias_fp16_x_fp32", "mixed", lambda: sparse24_call(bias=torch.randn(N).half()), TypeError,
        r"sparse24_linear\(bias\): dtype"),
    bad("x_meta", "device", lambda: sparse24_call(torch.randn(3, K, device="meta"), sparse_weight()), ValueError,
        r"sparse24_linear\(x\): x is on meta but the weight is on cpu"),
    bad("bias_meta", "device", lambda: sparse24_call(bias=torch.randn(N, device="meta")), ValueError,
        r"sparse24_linear\(bias\): bias is on meta"),
    bad("x_cuda_weight_cpu", "device", lambda: sparse24_call(torch.randn(3, K, device="cuda"), sparse_weight()),
        ValueError, r"sparse24_linear\(x\): x is on cuda:0", requires="cuda"),
    ok("all_meta", "device", lambda: sparse24_call(torch.randn(3, K, device="meta"), sparse_weight().to("meta"))),
    bad("x_last_dim", "shape", lambda: sparse24_call(torch.randn(3, K + 4), sparse_weight()), ValueError,
        r"sparse24_linear\(x\): last dimension must be in_features=64"),
    bad("x_0d", "shape", lambda: sparse24_call(torch.tensor(1.0), sparse_weight()), ValueError,
        r"sparse24_linear\(x\): last dimension"),
    bad("bias_shape", "shape", lambda: sparse24_call(bias=torch.randn(N + 1)), ValueError,
        r"sparse24_linear\(bias\): expected shape \(24,\)"),
    ok("x_1d", "shape", lambda: sparse24_call(torch.randn(K))),
    ok("rows_0", "empty", lambda: sparse24_call(torch.randn(0, K))),
    ok("batch_0", "empty", lambda: sparse24_call(torch.randn(0, 2, K))),
    ok("x_transposed", "view", lambda: sparse24_call(torch.randn(K, 3).t())),
    ok("x_sliced_k", "view", lambda: sparse24_call(torch.randn(3, 2 * K)[:, 1::2])),
    ok("x_storage_offset", "view", lambda: sparse24_call(torch.randn(5, K)[2:])),
    ok("x_expanded", "view", lambda: sparse24_call(torch.randn(1, K).expand(4, K))),
    ok("bias_strided", "view", lambda: sparse24_call(bias=torch.randn(N, 2)[:, 0])),
    ok("x_nan_row", "nonfinite", lambda: sparse24_call(_poison(torch.randn(3, K), 0))),
    ok("x_inf", "nonfinite", lambda: sparse24_call(torch.randn(3, K).index_put_((torch.tensor([1]), torch.tensor([9])),
                                                                                 torch.tensor(float("-inf"))))),
    ok("weight_nan", "nonfinite", lambda: sparse24_call(w=_sparse_nan_weight())),
    ok("bias_inf", "nonfinite", lambda: sparse24_call(bias=_poison(torch.randn(N), 4, float("inf")))),
    ok("meta_rows_past_2^31", "int32", lambda: sparse24_call(torch.empty(BIG // K + 1, K, device="meta"),
                                                              sparse_weight().to("meta"))),
    bad("triton_out_past_2^31", "int32", lambda: sparse24_call(torch.randn(1, K).expand(BIG // N + 1, K)),
        tk.BackendUnavailable, r"sparse24_mm.*'triton'.*out.*2\^31", backends=("triton",)),
    bad("x_list", "type", lambda: sparse24_call([0.0] * K, sparse_weight()), TypeError,
        r"sparse24_linear\(x\): expected a torch.Tensor"),
    bad("weight_int4", "type", lambda: sparse24_call(w=make_weight(N, K, 32)), TypeError,
        r"sparse24_linear\(weight\): expected a turbokernels.Sparse24Weight"),
    bad("bias_list", "type", lambda: sparse24_call(bias=[0.0] * N),
        TypeError, r"sparse24_linear\(bias\): expected a torch.Tensor"),
]


def s24i4_weight(dtype=torch.float16, n=N, k=K):
    return tk.Sparse24Int4Weight.from_dense(tk.prune_24(torch.randn(n, k)).to(dtype), group_size=32)


def s24i4_call(x=None, w=None, bias=None) -> Call:
    x = torch.randn(3, K) if x is None else x
    w = s24i4_weight() if w is None else w
    w64 = (lambda: w.dequantize(torch.float64)) if w.device.type != "meta" else None
    return Call(lambda: tk.sparse24_int4_linear(x, w, bias), _linear_check("sparse24_int4_linear", x, w64, bias, True))


def _s24i4_nan_weight():
    w = s24i4_weight()
    w.int4.scales[0, 3] = float("inf")
    return w


SPARSE24_INT4_LINEAR = [
    ok("fp32", "dtype", lambda: s24i4_call()),
    ok("fp16", "dtype", lambda: s24i4_call(torch.randn(3, K).half())),
    ok("bf16", "dtype", lambda: s24i4_call(torch.randn(3, K).bfloat16())),
    bad("x_float64", "dtype", lambda: s24i4_call(torch.randn(3, K, dtype=torch.float64)), TypeError,
        r"sparse24_int4_linear\(x\): dtype must be"),
    bad("x_int", "dtype", lambda: s24i4_call(torch.ones(3, K, dtype=torch.int16)), TypeError,
        r"sparse24_int4_linear\(x\): dtype"),
    ok("x_bf16_scales_fp16", "mixed", lambda: s24i4_call(torch.randn(3, K).bfloat16(), s24i4_weight(torch.float16))),
    bad("bias_fp16_x_fp32", "mixed", lambda: s24i4_call(bias=torch.randn(N).half()), TypeError,
        r"sparse24_int4_linear\(bias\): dtype"),
    bad("x_meta", "device", lambda: s24i4_call(torch.randn(3, K, device="meta")), ValueError,
        r"sparse24_int4_linear\(x\): x is on meta"),
    bad("bias_meta", "device", lambda: s24i4_call(bias=torch.randn(N, device="meta")), ValueError,
        r"sparse24_int4_linear\(bias\): bias is on meta"),
    bad("x_cuda_weight_cpu", "device", lambda: s24i4_call(torch.randn(3, K, device="cuda")), ValueError,
        r"sparse24_int4_linear\(x\): x is on cuda:0", requires="cuda"),
    ok("all_meta", "device", lambda: s24i4_call(torch.randn(3, K, device="meta"), s24i4_weight().to("meta"))),
    bad("x_last_dim", "shape", lambda: s24i4_call(torch.randn(3, 32)), ValueError,
        r"sparse24_int4_linear\(x\): last dimension must be in_features=64"),
    bad("bias_shape", "shape", lambda: s24i4_call(bias=torch.randn(2, N)), ValueError,
        r"sparse24_int4_linear\(bias\): expected shape"),
    ok("x_3d", "shape", lambda: s24i4_call(torch.randn(2, 3, K))),
    ok("rows_0", "empty", lambda: s24i4_call(torch.randn(0, K))),
    ok("x_transposed", "view", lambda: s24i4_call(torch.randn(K, 5).t())),
    ok("x_storage_offset", "view", lambda: s24i4_call(torch.randn(2 * K + 1)[1:].view(2, K))),
    ok("x_sliced_k", "view", lambda: s24i4_call(torch.randn(2, K, 3)[..., 1])),
    ok("x_nan_row", "nonfinite", lambda: s24i4_call(torch.randn(3, K).index_fill_(0, torch.tensor([2]), float("nan")))),
    ok("scale_inf", "nonfinite", lambda: s24i4_call(w=_s24i4_nan_weight())),
    # an Inf in x meets the pruned zeros of every row: the spec's dense product is NaN there, and the C++ kernel,
    # which skips those zeros, sets them to NaN after the sum (csrc/cpu/sparse24_int4_mm.cpp)
    ok("x_inf", "nonfinite", lambda: s24i4_call(torch.randn(3, K).index_put_((torch.tensor([1]), torch.tensor([9])),
                                                                             torch.tensor(float("-inf"))))),
    ok("meta_rows_past_2^31", "int32", lambda: s24i4_call(torch.empty(BIG // K + 1, K, device="meta"),
                                                           s24i4_weight().to("meta"))),
    bad("triton_out_past_2^31", "int32", lambda: s24i4_call(torch.randn(1, K).expand(BIG // N + 1, K)),
        tk.BackendUnavailable, r"sparse24_int4_mm.*'triton'.*out.*2\^31", backends=("triton",)),
    bad("x_list", "type", lambda: s24i4_call([0.0] * K),
        TypeError, r"sparse24_int4_linear\(x\): expected a torch.Tensor"),
    bad("weight_sparse24", "type", lambda: s24i4_call(w=sparse_weight()), TypeError,
        r"sparse24_int4_linear\(weight\): expected a turbokernels.Sparse24Int4Weight"),
]


# ---- attention ----------------------------------------------------------------------------------------------------
B, SQ, SK, HQ, HKV, D = 2, 5, 7, 4, 2, 16


def qkv(dtype=torch.float16, b=B, sq=SQ, sk=SK, hq=HQ, hkv=HKV, d=D, device="cpu"):
    return (torch.randn(b, sq, hq, d, device=device).to(dtype), torch.randn(b, sk, hkv, d, device=device).to(dtype),
            torch.randn(b, sk, hkv, d, device=device).to(dtype))


def attn_call(q=None, k=None, v=None, **kw) -> Call:
    if q is None:
        q, k, v = qkv()
    ref_kw = {n: a for n, a in kw.items() if n not in ("deterministic", "max_seqlen_q", "max_seqlen_k", "return_lse")}

    def check(out, backend):
        if q.device.type == "meta":
            return assert_meta_like(out, q.shape, q.dtype)
        golden, _ = ref_attention.attention(q.double(), k.double(), v.double(), **ref_kw)
        allowance, _ = attention_allowance(q, k, v, operand_dtype=_opd(backend, q.dtype),
                                           exp_error=_expe(backend, q.dtype), **ref_kw)
        assert out.dtype == q.dtype
        assert_matches(out, golden, allowance, what=f"attention {backend}")
    return Call(lambda: tk.attention(q, k, v, **kw), check)


def varlen(lens_q=(3, 0, 4), lens_k=(5, 2, 4), dtype=torch.float16, **kw):
    cu_q = torch.tensor([0, *np.cumsum(lens_q)], dtype=torch.int32)
    cu_k = torch.tensor([0, *np.cumsum(lens_k)], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), HQ, D).to(dtype)
    k, v = torch.randn(int(cu_k[-1]), HKV, D).to(dtype), torch.randn(int(cu_k[-1]), HKV, D).to(dtype)
    return q, k, v, cu_q, cu_k


def varlen_call(cu_q=None, cu_k=None, **kw) -> Call:
    q, k, v, good_q, good_k = varlen()
    return attn_call(q, k, v, cu_seqlens_q=good_q if cu_q is None else cu_q,
                     cu_seqlens_k=good_k if cu_k is None else cu_k, **kw)


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def _poison(t, index, value=float("nan")):
    t = t.clone()
    t[index] = value
    return t


def _nan_key_behind_causal():
    q, k, v = qkv(sq=SK)
    return attn_call(q, _poison(k, (slice(None), SK - 1)), v, causal=True)


ATTENTION = [
    ok("fp16", "dtype", lambda: attn_call()),
    ok("bf16", "dtype", lambda: attn_call(*qkv(torch.bfloat16))),
    ok("fp32", "dtype", lambda: attn_call(*qkv(torch.float32), causal=True)),
    ok("fp64_reference", "dtype", lambda: attn_call(*qkv(torch.float64)), backends=("reference",)),
    bad("fp64_triton", "dtype", lambda: attn_call(*qkv(torch.float64)), tk.BackendUnavailable,
        r"attention_fwd.*'triton'.*float64", backends=("triton",)),
    bad("q_int", "dtype", lambda: attn_call(*(t.to(torch.int32) for t in qkv())), TypeError,
        r"attention\(q\): dtype must be float16, bfloat16 or float32"),
    bad("alibi_fp16", "dtype", lambda: attn_call(alibi_slopes=torch.rand(HQ).half()), TypeError,
        r"attention\(alibi_slopes\): dtype must be torch.float32"),
    bad("k_fp32_q_fp16", "mixed", lambda: attn_call(qkv()[0], *(t.float() for t in qkv()[1:])), TypeError,
        r"attention\(k\): dtype torch.float32 does not match q's torch.float16"),
    bad("v_bf16", "mixed", lambda: attn_call(*qkv()[:2], qkv(torch.bfloat16)[2]), TypeError,
        r"attention\(v\): dtype torch.bfloat16 does not match"),
    bad("k_meta", "device", lambda: attn_call(qkv()[0], *(t.to("meta") for t in qkv()[1:])), ValueError,
        r"attention\(k\): is on meta but q is on cpu"),
    bad("alibi_meta", "device", lambda: attn_call(alibi_slopes=torch.rand(HQ, device="meta")), ValueError,
        r"attention\(alibi_slopes\): is on meta"),
    bad("cu_seqlens_meta", "device", lambda: varlen_call(cu_q=i32(0, 3, 3, 7).to("meta")), ValueError,
        r"attention\(cu_seqlens_q\): is on meta but q is on cpu"),
    bad("k_cuda", "device", lambda: attn_call(qkv()[0], *(t.cuda() for t in qkv()[1:])), ValueError,
        r"attention\(k\): is on cuda", requires="cuda"),
    ok("all_meta", "device", lambda: attn_call(*qkv(device="meta"))),
    bad("q_3d_dense", "shape", lambda: attn_call(*(t[0] for t in qkv())), ValueError,
        r"attention\(q\): expected \(batch, seqlen, heads, head_dim\)"),
    bad("k_batch", "shape", lambda: attn_call(qkv()[0], *(t[:1] for t in qkv()[1:])), ValueError,
        r"attention\(k\): batch 1 does not match q's 2"),
    bad("v_shape", "shape", lambda: attn_call(*qkv()[:2], qkv()[2][:, :3]), ValueError,
        r"attention\(v\): shape .* must equal k's"),
    bad("heads_not_multiple", "shape", lambda: attn_call(*qkv(hq=3, hkv=2)), ValueError,
        r"attention\(k\): heads_q=3 must be a multiple of heads_kv=2"),
    bad("head_dim_257", "shape", lambda: attn_call(*qkv(d=257)),
        ValueError, r"attention\(q\): head_dim must be in 1..256"),
    bad("k_head_dim", "shape", lambda: attn_call(qkv()[0], *qkv(d=8)[1:]), ValueError,
        r"attention\(k\): head_dim 8 does not match q's 16"),
    bad("alibi_shape", "shape", lambda: attn_call(alibi_slopes=torch.rand(HQ + 1)), ValueError,
        r"attention\(alibi_slopes\): expected shape"),
    bad("head_dim_0", "empty", lambda: attn_call(*qkv(d=0)), ValueError, r"attention\(q\): head_dim must be in 1..256"),
    bad("heads_0", "empty", lambda: attn_call(*qkv(hq=0, hkv=0)), ValueError, r"attention\(k\): heads_q=0"),
    ok("batch_0", "empty", lambda: attn_call(*qkv(b=0))),
    ok("seqlen_q_0", "empty", lambda: attn_call(*qkv(sq=0))),
    ok("seqlen_k_0", "empty", lambda: attn_call(*qkv(sk=0))),
    ok("varlen_all_empty", "empty", lambda: attn_call(*varlen((0, 0), (0, 0))[:3], cu_seqlens_q=i32(0, 0, 0),
                                                      cu_seqlens_k=i32(0, 0, 0))),
    ok("q_from_bhsd", "view", lambda: attn_call(*(torch.randn(B, h, s, D).half().transpose(1, 2)
                                                  for h, s in ((HQ, SQ), (HKV, SK), (HKV, SK))))),
    ok("k_head_dim_strided", "view", lambda: attn_call(qkv()[0], torch.randn(B, SK, HKV, 2 * D).half()[..., ::2],
                                                       qkv()[2])),
    ok("storage_offset", "view", lambda: attn_call(*(t[1:] for t in qkv(b=B + 1)))),
    ok("alibi_batch_strided", "view", lambda: attn_call(alibi_slopes=torch.rand(HQ, B).t() * 0.3, causal=True)),
    ok("v_expanded", "view", lambda: attn_call(*qkv()[:2], torch.randn(1, SK, HKV, D).half().expand(B, -1, -1, -1))),
    ok("varlen_sliced", "view", lambda: attn_call(*(torch.randn(t.shape[0], t.shape[1], 2 * D).half()[..., D:]
                                                    for t in varlen()[:3]), cu_seqlens_q=varlen()[3],
                                                  cu_seqlens_k=varlen()[4])),
    ok("q_nan_row", "nonfinite", lambda: attn_call(_poison(qkv()[0], (0, 2, 1)), *qkv()[1:])),
    ok("k_nan", "nonfinite", lambda: attn_call(qkv()[0], _poison(qkv()[1], (1, 3, 0)), qkv()[2])),
    ok("v_inf", "nonfinite", lambda: attn_call(*qkv()[:2], _poison(qkv()[2], (0, 0, 1, 5), float("inf")))),
    ok("k_nan_hidden_by_causal", "nonfinite", _nan_key_behind_causal),
    ok("meta_tokens_past_2^31", "int32", lambda: attn_call(*qkv(b=1, sq=BIG // (HQ * D) + 1, sk=BIG // (HKV * D) + 1,
                                                                device="meta"), causal=True)),
    ok("varlen", "cu_seqlens", lambda: varlen_call()),
    ok("varlen_causal_window", "cu_seqlens", lambda: varlen_call(causal=True, window_size=(2, 0))),
    ok("strided", "cu_seqlens", lambda: varlen_call(cu_q=i32(0, 9, 3, 9, 3, 9, 7)[::2],
                                                    cu_k=i32(0, 5, 7, 11, 99).view(1, 5)[0, :4])),
    bad("decreasing", "cu_seqlens", lambda: varlen_call(cu_q=i32(0, 3, 2, 7)), ValueError,
        r"attention\(cu_seqlens_q\): must be non-decreasing"),
    bad("not_from_0", "cu_seqlens", lambda: varlen_call(cu_k=i32(1, 6, 8, 11)), ValueError,
        r"attention\(cu_seqlens_k\): must start at 0"),
    bad("last_below_total", "cu_seqlens", lambda: varlen_call(cu_q=i32(0, 3, 3, 6)), ValueError,
        r"attention\(cu_seqlens_q\): must end at the packed length 7 \(q.shape\[0\]\), got 6"),
    bad("last_above_total", "cu_seqlens", lambda: varlen_call(cu_k=i32(0, 5, 7, 12)), ValueError,
        r"attention\(cu_seqlens_k\): must end at the packed length 11 \(k.shape\[0\]\), got 12"),
    bad("negative", "cu_seqlens", lambda: varlen_call(cu_q=i32(0, -3, 3, 7)), ValueError,
        r"attention\(cu_seqlens_q\): must be non-decreasing"),
    bad("int64", "cu_seqlens", lambda: varlen_call(cu_q=i32(0, 3, 3, 7).long()), TypeError,
        r"attention\(cu_seqlens_q\): dtype must be torch.int32, got torch.int64"),
    bad("2d", "cu_seqlens", lambda: varlen_call(cu_k=i32(0, 5, 7, 11).view(1, 4)), ValueError,
        r"attention\(cu_seqlens_k\): expected shape \(batch \+ 1,\)"),
    bad("empty", "cu_seqlens", lambda: varlen_call(cu_q=i32(), cu_k=i32()), ValueError,
        r"attention\(cu_seqlens_q\): expected shape \(batch \+ 1,\)"),
    bad("batch_mismatch", "cu_seqlens", lambda: varlen_call(cu_k=i32(0, 11)), ValueError,
        r"attention\(cu_seqlens_k\): shape \(2,\) does not match cu_seqlens_q's \(4,\)"),
    bad("only_q", "cu_seqlens", lambda: attn_call(*varlen()[:3], cu_seqlens_q=varlen()[3]), ValueError,
        r"attention\(cu_seqlens_k\): cu_seqlens_q and cu_seqlens_k must be given together"),
    bad("list", "cu_seqlens", lambda: varlen_call(cu_q=[0, 3, 3, 7]), TypeError,
        r"attention\(cu_seqlens_q\): expected a torch.Tensor"),
    bad("cuda_q_cpu", "cu_seqlens", lambda: attn_call(*(t.cuda() for t in varlen()[:3]), cu_seqlens_q=varlen()[3],
                                                      cu_seqlens_k=varlen()[4].cuda()),
        ValueError, r"attention\(cu_seqlens_q\): is on cpu but q is on cuda", requires="cuda"),
    bad("window", "value", lambda: attn_call(window_size=(-2, 0)),
        ValueError, r"attention\(window_size\): must be >= -1"),
    bad("softcap", "value", lambda: attn_call(softcap=float("nan")), ValueError, r"attention\(softcap\)"),
    bad("scale_inf", "value", lambda: attn_call(softmax_scale=float("inf")), TypeError, r"attention\(softmax_scale\)"),
    bad("max_seqlen", "value", lambda: attn_call(max_seqlen_q=-1),
        ValueError, r"attention\(max_seqlen_q\): must be >= 0"),
    bad("q_list", "type", lambda: attn_call([1.0], *qkv()[1:]), TypeError, r"attention\(q\): expected a torch.Tensor"),
    bad("alibi_list", "type", lambda: attn_call(alibi_slopes=[0.1] * HQ), TypeError,
        r"attention\(alibi_slopes\): expected a torch.Tensor"),
]


# ---- scaled_dot_product_attention ---------------------------------------------------------------------------------
def bhsd(dtype=torch.float16, b=B, h=(HQ, HQ), s=(SQ, SK), d=D, device="cpu"):
    return tuple(torch.randn(b, heads, seqlen, d, device=device).to(dtype)
                 for heads, seqlen in ((h[0], s[0]), (h[1], s[1]), (h[1], s[1])))


def sdpa_call(q=None, k=None, v=None, fused=True, **kw) -> Call:
    """fused: compare with the float64 golden and the allowance of the fused kernel; else the call is torch's own
    F.scaled_dot_product_attention (a documented fallback), which it must equal."""
    if q is None:
        q, k, v = bhsd()

    def check(out, backend):
        if q.device.type == "meta":
            return assert_meta_like(out, q.shape[:-1] + (v.shape[-1],), q.dtype)
        if not fused:
            assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, **kw)), "not torch's own result"
            return
        causal = kw.get("is_causal", False)
        # torch's math path: in float64 F.sdpa may pick its CPU flash kernel (seen on a Sapphire Rapids), which
        # writes 0 for a NaN query row where the math (and our spec) give NaN
        with sdpa_kernel(SDPBackend.MATH):
            golden = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                                    scale=kw.get("scale"), enable_gqa=kw.get("enable_gqa", False))
        allowance, _ = attention_allowance(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                           softmax_scale=kw.get("scale"), operand_dtype=_opd(backend, q.dtype),
                                           exp_error=_expe(backend, q.dtype))
        assert_matches(out, golden, allowance.map(lambda t: t.transpose(1, 2)), what=f"sdpa {backend}")
    return Call(lambda: tk.scaled_dot_product_attention(q, k, v, **kw), check)


SDPA_FALLBACK = {"fused": False}
SDPA = [
    ok("fp16", "dtype", lambda: sdpa_call()),
    ok("bf16_causal", "dtype", lambda: sdpa_call(*bhsd(torch.bfloat16, s=(SK, SK)), is_causal=True)),
    ok("fp32_gqa", "dtype", lambda: sdpa_call(*bhsd(torch.float32, h=(HQ, HKV)), enable_gqa=True)),
    bad("query_int", "dtype", lambda: sdpa_call(*(t.to(torch.int64) for t in bhsd())), TypeError,
        r"scaled_dot_product_attention\(query\): dtype must be float16, bfloat16, float32 or float64"),
    bad("key_fp32", "mixed", lambda: sdpa_call(bhsd()[0], bhsd()[1].float(), bhsd()[2]), TypeError,
        r"scaled_dot_product_attention\(key\): dtype torch.float32 does not match query's torch.float16"),
    bad("value_bf16_with_mask", "mixed", lambda: sdpa_call(*bhsd()[:2], bhsd()[2].bfloat16(),
                                                           attn_mask=torch.ones(SQ, SK, dtype=torch.bool)),
        TypeError, r"scaled_dot_product_attention\(value\): dtype"),
    bad("value_meta", "device", lambda: sdpa_call(*bhsd()[:2], bhsd()[2].to("meta")), ValueError,
        r"scaled_dot_product_attention\(value\): is on meta but query is on cpu"),
    bad("mask_meta", "device", lambda: sdpa_call(*bhsd(), attn_mask=torch.ones(SQ, SK, dtype=torch.bool,
                                                                               device="meta")),
        ValueError, r"scaled_dot_product_attention\(attn_mask\): is on meta but query is on cpu"),
    bad("key_cuda", "device", lambda: sdpa_call(bhsd()[0], *(t.cuda() for t in bhsd()[1:])), ValueError,
        r"scaled_dot_product_attention\(key\): is on cuda", requires="cuda"),
    ok("all_meta", "device", lambda: sdpa_call(*bhsd(device="meta"))),
    bad("heads_without_gqa", "shape", lambda: sdpa_call(*bhsd(h=(HQ, HKV))), ValueError,
        r"scaled_dot_product_attention\(key\): query has 4 heads and key 2; pass enable_gqa=True"),
    bad("rank_mismatch", "shape", lambda: sdpa_call(bhsd()[0], *(t[0] for t in bhsd()[1:])), ValueError,
        r"scaled_dot_product_attention\(key\): expected .* dims like query"),
    bad("query_1d", "shape", lambda: sdpa_call(*(t[0, 0, 0] for t in bhsd())), ValueError,
        r"scaled_dot_product_attention\(query\): expected \(\.\.\., seqlen, head_dim\)"),
    bad("value_seqlen", "shape", lambda: sdpa_call(*bhsd()[:2], bhsd()[2][:, :, :3]), ValueError,
        r"scaled_dot_product_attention\(value\): .*seqlen 3 does not match key's 7"),
    bad("key_head_dim", "shape", lambda: sdpa_call(bhsd()[0], *bhsd(d=8)[1:]), ValueError,
        r"scaled_dot_product_attention\(key\): head_dim 8 does not match query's 16"),
    ok("3d_fallback", "shape", lambda: sdpa_call(*(t[0] for t in bhsd()), **SDPA_FALLBACK)),
    ok("causal_sq_ne_sk_fallback", "shape", lambda: sdpa_call(*bhsd(), is_causal=True, **SDPA_FALLBACK)),
    ok("mask_fallback", "shape", lambda: sdpa_call(*bhsd(), attn_mask=torch.rand(SQ, SK) > 0.3, **SDPA_FALLBACK)),
    ok("seqlen_q_0", "empty", lambda: sdpa_call(*bhsd(s=(0, SK)))),
    ok("batch_0", "empty", lambda: sdpa_call(*bhsd(b=0))),
    ok("bshd_transposed", "view", lambda: sdpa_call(*(torch.randn(B, s, HQ, D).half().transpose(1, 2)
                                                      for s in (SQ, SK, SK)))),
    ok("storage_offset", "view", lambda: sdpa_call(*(t[:, 1:] for t in bhsd(h=(HQ + 1, HQ + 1))))),
    ok("query_nan", "nonfinite", lambda: sdpa_call(_poison(bhsd()[0], (1, 2, 3, 4)), *bhsd()[1:])),
    ok("meta_past_2^31", "int32", lambda: sdpa_call(*bhsd(b=1, s=(BIG // (HQ * D) + 1, 8), device="meta"))),
    bad("dropout_negative", "value", lambda: sdpa_call(*bhsd(), dropout_p=-0.5), ValueError,
        r"scaled_dot_product_attention\(dropout_p\): must be in \[0, 1\]"),
    bad("scale_nan", "value", lambda: sdpa_call(*bhsd(), scale=float("nan")), ValueError,
        r"scaled_dot_product_attention\(scale\): expected a finite float or None"),
    bad("query_list", "type", lambda: sdpa_call([[1.0]], *bhsd()[1:]), TypeError,
        r"scaled_dot_product_attention\(query\): expected a torch.Tensor"),
]


# ---- decode_attention and kv_cache_append --------------------------------------------------------------------------
CB, T, CS, PS = 2, 2, 32, 16  # batch, new tokens, contiguous capacity, page size


def cache(b=CB, s=CS, hkv=HKV, d=D, dtype=torch.float16, device="cpu"):
    k = torch.randn(b, s, hkv, d, device=device).to(dtype)
    return k, torch.randn_like(k)


def paged_cache(num_pages=5, dtype=torch.float16):
    """5 pages of 16; sequence 0 owns pages 3, 0; sequence 1 owns 4, 1 (page 2 spare, garbage)."""
    k, v = cache(num_pages, PS, dtype=dtype)
    return k * 10, v * 10, i32(3, 0, 4, 1).view(2, 2)


def decode_call(q=None, k_cache=None, v_cache=None, seqlens=None, **kw) -> Call:
    q = torch.randn(CB, T, HQ, D).half() if q is None else q
    if k_cache is None:
        k_cache, v_cache = cache(q.shape[0], dtype=q.dtype if q.dtype.is_floating_point else torch.float16)
    seqlens = i32(*([CS, T + 3, 9, 20][:k_cache.shape[0]])) if seqlens is None else seqlens

    def check(out, backend):
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])
        if kw.get("return_lse"):
            out, lse = out
            assert lse.dtype == torch.float32 and tuple(lse.shape) == lse_shape, (lse.dtype, tuple(lse.shape))
        if q.device.type == "meta":
            return assert_meta_like(out, q.shape, q.dtype)
        scale = q.shape[-1] ** -0.5 if kw.get("softmax_scale") is None else kw["softmax_scale"]
        window = kw.get("window_size", (-1, -1))
        window = window.tolist() if isinstance(window, torch.Tensor) else window
        args = (seqlens, kw.get("block_table"), kw.get("alibi_slopes"), scale, window[0], window[1],
                kw.get("softcap", 0.0))
        opts = {k: kw[k] for k in ("cache_batch_idx", "cache_leftpad", "causal") if k in kw}
        golden, golden_lse = ref_decode.decode_attention(q.double(), k_cache.double(), v_cache.double(), *args,
                                                         return_lse=True, **opts)
        allowance, lse_allowance = decode_allowance(q, k_cache, v_cache, *args, operand_dtype=_opd(backend, q.dtype),
                                                    exp_error=_expe(backend, q.dtype), return_lse=True, **opts)
        assert out.dtype == q.dtype
        assert_matches(out, golden, allowance, what=f"decode_attention {backend}")
        if kw.get("return_lse"):
            assert_matches(lse, golden_lse, lse_allowance, what=f"decode_attention {backend} lse")
    return Call(lambda: tk.decode_attention(q, k_cache, v_cache, seqlens, **kw), check)


def paged_decode_call(block_table=None, seqlens=None, **kw) -> Call:
    k, v, bt = paged_cache()
    return decode_call(torch.randn(CB, T, HQ, D).half(), k, v, i32(30, 7) if seqlens is None else seqlens,
                       block_table=bt if block_table is None else block_table, **kw)


def _nan_past_length():
    k, v = cache()
    k[:, 20:] = float("nan")
    return decode_call(k_cache=k, v_cache=v, seqlens=i32(20, 11))


NOT_CPU = ("reference", "triton", "torch")  # the cpu (C++) backend declines FlashAttention's options
DECODE = [
    ok("fp16", "dtype", lambda: decode_call()),
    ok("bf16_paged", "dtype", lambda: decode_call(torch.randn(CB, 1, HQ, D).bfloat16(),
                                                 *paged_cache(dtype=torch.bfloat16)[:2], i32(17, 32),
                                                 block_table=paged_cache()[2])),
    ok("fp32", "dtype", lambda: decode_call(torch.randn(CB, T, HQ, D))),
    bad("q_int", "dtype", lambda: decode_call(torch.ones(CB, T, HQ, D, dtype=torch.int32)), TypeError,
        r"decode_attention\(q\): dtype must be float16, bfloat16 or float32"),
    bad("seqlens_int64", "dtype", lambda: decode_call(seqlens=torch.tensor([5, 6])), TypeError,
        r"decode_attention\(cache_seqlens\): dtype must be torch.int32, got torch.int64"),
    bad("alibi_fp64", "dtype", lambda: decode_call(alibi_slopes=torch.rand(HQ, dtype=torch.float64)), TypeError,
        r"decode_attention\(alibi_slopes\): dtype must be torch.float32"),
    bad("block_table_int64", "dtype", lambda: paged_decode_call(block_table=i32(3, 0, 4, 1).view(2, 2).long()),
        TypeError, r"decode_attention\(block_table\): dtype must be torch.int32"),
    bad("cache_fp32_q_fp16", "mixed", lambda: decode_call(k_cache=cache()[0].float(), v_cache=cache()[1].float()),
        TypeError, r"decode_attention\(k_cache\): dtype torch.float32 does not match q's torch.float16"),
    bad("v_cache_bf16", "mixed", lambda: decode_call(k_cache=cache()[0], v_cache=cache()[1].bfloat16()), TypeError,
        r"decode_attention\(v_cache\): dtype torch.bfloat16 does not match"),
    bad("cache_meta", "device", lambda: decode_call(k_cache=cache(device="meta")[0], v_cache=cache(device="meta")[1]),
        ValueError, r"decode_attention\(k_cache\): k_cache is on meta but q is on cpu"),
    bad("seqlens_meta", "device", lambda: decode_call(seqlens=i32(3, 4).to("meta")), ValueError,
        r"decode_attention\(cache_seqlens\): cache_seqlens is on meta"),
    bad("block_table_meta", "device", lambda: paged_decode_call(block_table=i32(3, 0, 4, 1).view(2, 2).to("meta")),
        ValueError, r"decode_attention\(block_table\): block_table is on meta"),
    bad("cache_cuda", "device", lambda: decode_call(k_cache=cache(device="cuda")[0], v_cache=cache(device="cuda")[1]),
        ValueError, r"decode_attention\(k_cache\): k_cache is on cuda", requires="cuda"),
    ok("all_meta", "device", lambda: decode_call(torch.randn(CB, T, HQ, D, device="meta").half(),
                                                 *cache(device="meta"), i32(3, 4).to("meta"))),
    bad("q_3d", "shape", lambda: decode_call(torch.randn(CB, HQ, D).half()), ValueError,
        r"decode_attention\(q\): expected 4 dims"),
    bad("cache_batch", "shape", lambda: decode_call(k_cache=cache(1)[0], v_cache=cache(1)[1], seqlens=i32(3, 4)),
        ValueError,
        r"decode_attention\(k_cache\): batch 1 does not match q's 2"),
    bad("v_cache_shape", "shape", lambda: decode_call(k_cache=cache()[0], v_cache=cache(s=16)[1]), ValueError,
        r"decode_attention\(v_cache\): shape .* does not match k_cache's"),
    bad("heads", "shape", lambda: decode_call(torch.randn(CB, T, 3, D).half()), ValueError,
        r"decode_attention\(q\): heads_q=3 must be a multiple"),
    bad("head_dim", "shape", lambda: decode_call(torch.randn(CB, T, HQ, 8).half()), ValueError,
        r"decode_attention\(q\): head_dim 8 does not match the caches' 16"),
    bad("seqlens_shape", "shape", lambda: decode_call(seqlens=i32(3)), ValueError,
        r"decode_attention\(cache_seqlens\): expected shape \(2,\)"),
    bad("page_size_8", "shape", lambda: decode_call(torch.randn(CB, T, HQ, D).half(), *cache(6, 8), i32(9, 9),
                                                    block_table=i32(0, 1, 2, 3).view(2, 2)), ValueError,
        r"decode_attention\(k_cache\): page_size .* must be a multiple of 16, got 8"),
    bad("alibi_shape", "shape", lambda: decode_call(alibi_slopes=torch.rand(CB, HQ + 1)), ValueError,
        r"decode_attention\(alibi_slopes\): expected shape"),
    ok("batch_0", "empty", lambda: decode_call(torch.randn(0, T, HQ, D).half(), *cache(0), i32())),
    ok("new_tokens_0", "empty", lambda: decode_call(torch.randn(CB, 0, HQ, D).half())),
    ok("lengths_0", "empty", lambda: decode_call(seqlens=i32(0, 0))),
    bad("head_dim_0", "empty", lambda: decode_call(torch.randn(CB, T, HQ, 0).half(), *cache(d=0)), ValueError,
        r"decode_attention\(q\): head_dim must be in 1..256"),
    ok("q_from_bhtd", "view", lambda: decode_call(torch.randn(CB, HQ, T, D).half().transpose(1, 2))),
    ok("cache_storage_offset", "view", lambda: decode_call(k_cache=cache(CB + 1)[0][1:], v_cache=cache(CB + 1)[1][1:])),
    ok("cache_heads_strided", "view", lambda: decode_call(k_cache=cache(hkv=2 * HKV)[0][:, :, ::2],
                                                          v_cache=cache(hkv=2 * HKV)[1][:, :, 1::2])),
    ok("seqlens_strided", "view", lambda: decode_call(seqlens=i32(CS, 1, 9, 0)[::2])),
    ok("alibi_strided", "view", lambda: decode_call(alibi_slopes=torch.rand(HQ, CB).t() * 0.3)),
    ok("block_table_strided", "view", lambda: paged_decode_call(i32(3, 9, 0, 9, 4, 9, 1, 9).view(2, 4)[:, ::2])),
    bad("cache_head_dim_strided", "view", lambda: decode_call(k_cache=cache(d=2 * D)[0][..., ::2],
                                                              v_cache=cache()[1]), ValueError,
        r"decode_attention\(k_cache\): must be contiguous in the last \(head_dim\) dimension"),
    ok("q_nan", "nonfinite", lambda: decode_call(_poison(torch.randn(CB, T, HQ, D).half(), (1, 0, 2)))),
    ok("k_nan_past_length", "nonfinite", _nan_past_length),
    ok("v_inf_in_use", "nonfinite", lambda: decode_call(v_cache=_poison(cache()[1], (0, 3, 1, 2), float("inf")),
                                                        k_cache=cache()[0])),
    ok("meta_cache_past_2^31", "int32", lambda: decode_call(torch.randn(1, 1, HQ, D, device="meta").half(),
                                                            *cache(1, BIG // (HKV * D) + 16, device="meta"),
                                                            i32(5).to("meta"))),
    ok("paged", "block_table", lambda: paged_decode_call()),
    ok("unused_entries_out_of_range", "block_table", lambda: paged_decode_call(i32(3, 99, 4, -7).view(2, 2),
                                                                               i32(16, 9))),
    bad("negative", "block_table", lambda: paged_decode_call(i32(3, -1, 4, 1).view(2, 2)), ValueError,
        r"decode_attention\(block_table\): page index out of range \[0, 5\)"),
    bad("past_num_pages", "block_table", lambda: paged_decode_call(i32(3, 0, 5, 1).view(2, 2)), ValueError,
        r"decode_attention\(block_table\): page index out of range \[0, 5\)"),
    bad("too_narrow", "block_table", lambda: paged_decode_call(i32(3, 4).view(2, 1), i32(16, 17)), ValueError,
        r"decode_attention\(cache_seqlens\): .*17 .* the cache holds 16 .*pages per sequence"),
    bad("1d", "block_table", lambda: paged_decode_call(i32(3, 0, 4, 1)), ValueError,
        r"decode_attention\(block_table\): expected shape \(2, max_pages_per_seq\)"),
    bad("list", "block_table", lambda: paged_decode_call([[3, 0], [4, 1]]), TypeError,
        r"decode_attention\(block_table\): expected a torch.Tensor"),
    bad("seqlens_past_capacity", "capacity", lambda: decode_call(seqlens=i32(CS + 1, 3)), ValueError,
        r"decode_attention\(cache_seqlens\): .*33 .* the cache holds 32"),
    bad("seqlens_negative", "capacity", lambda: decode_call(seqlens=i32(4, -1)), ValueError,
        r"decode_attention\(cache_seqlens\): negative length -1"),
    bad("window", "value", lambda: decode_call(window_size=(3,)), ValueError, r"decode_attention\(window_size\)"),
    bad("softcap", "value", lambda: decode_call(softcap=-2.0), ValueError, r"decode_attention\(softcap\)"),
    bad("softmax_scale", "value", lambda: decode_call(softmax_scale="1"),
        TypeError, r"decode_attention\(softmax_scale\)"),
    bad("q_list", "type", lambda: decode_call([0.0], *cache()),
        TypeError, r"decode_attention\(q\): expected a torch.Tensor"),
    bad("seqlens_list", "type", lambda: decode_call(seqlens=[3, 4]), TypeError,
        r"decode_attention\(cache_seqlens\): expected a torch.Tensor"),
    # FlashAttention's options (causal=False, cache_batch_idx, cache_leftpad, return_lse, a tensor window): the cpu
    # (C++) backend declines the first four, the automatic choice runs them on the torch backend
    ok("noncausal_window_lse", "value", lambda: decode_call(causal=False, window_size=(3, 1), return_lse=True),
       backends=NOT_CPU),
    ok("lse_no_key_rows", "value", lambda: decode_call(seqlens=i32(1, 0), return_lse=True), backends=NOT_CPU),
    ok("leftpad", "value", lambda: decode_call(cache_leftpad=i32(30, 2), return_lse=True), backends=NOT_CPU),
    ok("leftpad_paged_noncausal", "block_table", lambda: paged_decode_call(cache_leftpad=i32(17, 7), causal=False),
       backends=NOT_CPU),
    ok("batch_idx", "value", lambda: decode_call(k_cache=cache(3)[0], v_cache=cache(3)[1], seqlens=i32(CS, T + 3),
                                                 cache_batch_idx=i32(2, 0), cache_leftpad=i32(4, 1)), backends=NOT_CPU),
    ok("batch_idx_strided", "view", lambda: decode_call(cache_batch_idx=i32(1, 9, 1, 9)[::2]), backends=NOT_CPU),
    ok("window_tensor", "value", lambda: decode_call(window_size=torch.tensor([3, -1]))),
    ok("lse_batch_0", "empty", lambda: decode_call(torch.randn(0, T, HQ, D).half(), *cache(0), i32(), return_lse=True),
       backends=NOT_CPU),
    ok("lse_all_meta", "device", lambda: decode_call(torch.randn(CB, T, HQ, D, device="meta").half(),
                                                     *cache(device="meta"), i32(3, 4).to("meta"), return_lse=True,
                                                     cache_leftpad=i32(0, 1).to("meta"))),
    bad("batch_idx_int64", "dtype", lambda: decode_call(cache_batch_idx=torch.tensor([0, 1])), TypeError,
        r"decode_attention\(cache_batch_idx\): dtype must be torch.int32, got torch.int64"),
    bad("leftpad_int64", "dtype", lambda: decode_call(cache_leftpad=torch.tensor([0, 1])), TypeError,
        r"decode_attention\(cache_leftpad\): dtype must be torch.int32, got torch.int64"),
    bad("window_tensor_float", "dtype", lambda: decode_call(window_size=torch.tensor([3.0, -1.0])), TypeError,
        r"decode_attention\(window_size\): a tensor window must have an integer dtype"),
    bad("batch_idx_meta", "device", lambda: decode_call(cache_batch_idx=i32(0, 1).to("meta")), ValueError,
        r"decode_attention\(cache_batch_idx\): cache_batch_idx is on meta but q is on cpu"),
    bad("leftpad_meta", "device", lambda: decode_call(cache_leftpad=i32(0, 1).to("meta")), ValueError,
        r"decode_attention\(cache_leftpad\): cache_leftpad is on meta but q is on cpu"),
    bad("window_tensor_meta", "device", lambda: decode_call(window_size=torch.tensor([3, -1], device="meta")),
        ValueError, r"decode_attention\(window_size\): a meta tensor has no values"),
    bad("batch_idx_shape", "shape", lambda: decode_call(cache_batch_idx=i32(0, 1, 1)), ValueError,
        r"decode_attention\(cache_batch_idx\): expected shape \(2,\)"),
    bad("leftpad_2d", "shape", lambda: decode_call(cache_leftpad=i32(0, 1).view(2, 1)), ValueError,
        r"decode_attention\(cache_leftpad\): expected shape \(2,\)"),
    bad("window_tensor_shape", "shape", lambda: decode_call(window_size=torch.tensor([3, -1, 0])), ValueError,
        r"decode_attention\(window_size\): a tensor window must have shape \(2,\)"),
    bad("batch_idx_past_rows", "value", lambda: decode_call(cache_batch_idx=i32(0, 2)), ValueError,
        r"decode_attention\(cache_batch_idx\): row index 2 out of range \[0, 2\)"),
    bad("batch_idx_negative", "value", lambda: decode_call(cache_batch_idx=i32(-1, 0)), ValueError,
        r"decode_attention\(cache_batch_idx\): row index -1 out of range \[0, 2\)"),
    bad("batch_idx_paged", "block_table", lambda: paged_decode_call(cache_batch_idx=i32(0, 1)), ValueError,
        r"decode_attention\(cache_batch_idx\): not supported with block_table"),
    bad("leftpad_negative", "value", lambda: decode_call(cache_leftpad=i32(0, -1)), ValueError,
        r"decode_attention\(cache_leftpad\): negative value -1"),
    bad("leftpad_past_length", "capacity", lambda: decode_call(cache_leftpad=i32(3, T + 4)), ValueError,
        r"decode_attention\(cache_leftpad\): cache_leftpad\[1\] = 6 is past cache_seqlens\[1\] = 5"),
    bad("window_tensor_value", "value", lambda: decode_call(window_size=torch.tensor([-2, 0])), ValueError,
        r"decode_attention\(window_size\)"),
    bad("causal_int", "type", lambda: decode_call(causal=1), TypeError,
        r"decode_attention\(causal\): expected a bool, got int"),
    bad("return_lse_str", "type", lambda: decode_call(return_lse="yes"), TypeError,
        r"decode_attention\(return_lse\): expected a bool, got str"),
    bad("batch_idx_list", "type", lambda: decode_call(cache_batch_idx=[0, 1]), TypeError,
        r"decode_attention\(cache_batch_idx\): expected a torch.Tensor"),
]


def append_call(k_cache=None, v_cache=None, k_new=None, v_new=None, seqlens=None, **kw) -> Call:
    """kv_cache_append: on success the caches must equal the reference's append on copies, bit for bit; on any
    error, both caches must be bitwise unchanged."""
    if k_cache is None:
        k_cache, v_cache = cache()
    k_new = torch.randn(CB, T, HKV, D).half() if k_new is None else k_new
    v_new = torch.randn_like(k_new) if v_new is None and isinstance(k_new, torch.Tensor) else v_new
    seqlens = i32(5, CS - T) if seqlens is None else seqlens
    real = k_cache.device.type != "meta"
    before = (k_cache.clone(), v_cache.clone()) if real else None

    def check(out, backend):
        if not real:
            return assert_meta_like(out, seqlens.shape, torch.int32)
        k_ref, v_ref = before[0].clone(), before[1].clone()
        options = {k: v for k, v in kw.items() if k != "block_table"}  # cache_batch_idx, rotary_cos...
        want = ref_decode.kv_cache_append(k_ref, v_ref, k_new, v_new, seqlens, kw.get("block_table"), **options)
        assert torch.equal(out, want) and out.dtype == torch.int32
        assert _bitwise_equal(k_cache, k_ref) and _bitwise_equal(v_cache, v_ref), "the caches differ from the reference"

    def after():
        if real and not getattr(after, "succeeded", False):
            assert _bitwise_equal(k_cache, before[0]) and _bitwise_equal(v_cache, before[1]), "a cache was modified"

    def run():
        out = tk.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens, **kw)
        after.succeeded = True
        return out
    return Call(run, check, after)


def paged_append_call(block_table=None, seqlens=None, k_new=None, **kw) -> Call:
    k, v, bt = paged_cache()
    return append_call(k, v, k_new, None, i32(9, 30) if seqlens is None else seqlens,
                       block_table=bt if block_table is None else block_table, **kw)


def rotary(rows=CS, half=D // 2, dtype=torch.float16, device="cpu", **kw):
    """rotary_cos / rotary_sin keyword arguments: (rows, half) tables of random angles."""
    angles = torch.rand(rows, half) * 6.3
    return dict(rotary_cos=angles.cos().to(dtype).to(device), rotary_sin=angles.sin().to(dtype).to(device), **kw)


def _append_into_view():
    base_k, base_v = cache(CB + 1, CS + 4)
    return append_call(base_k[1:, 2:34], base_v[1:, 2:34])


KV_CACHE_APPEND = [
    ok("fp16", "dtype", lambda: append_call()),
    ok("fp32_paged", "dtype", lambda: append_call(*(t.float() for t in paged_cache()[:2]),
                                                  torch.randn(CB, T, HKV, D), None, i32(14, 0),
                                                  block_table=paged_cache()[2])),
    bad("k_new_int", "dtype", lambda: append_call(k_new=torch.ones(CB, T, HKV, D, dtype=torch.int32),
                                                  v_new=torch.ones(CB, T, HKV, D, dtype=torch.int32)), TypeError,
        r"kv_cache_append\(k_cache\): dtype torch.float16 does not match k_new's torch.int32"),
    bad("seqlens_int64", "dtype", lambda: append_call(seqlens=torch.tensor([1, 2])), TypeError,
        r"kv_cache_append\(cache_seqlens\): dtype must be torch.int32"),
    bad("k_new_fp32", "mixed", lambda: append_call(k_new=torch.randn(CB, T, HKV, D), v_new=torch.randn(CB, T, HKV, D)),
        TypeError, r"kv_cache_append\(k_cache\): dtype torch.float16 does not match k_new's torch.float32"),
    bad("v_new_bf16", "mixed", lambda: append_call(v_new=torch.randn(CB, T, HKV, D).bfloat16()), TypeError,
        r"kv_cache_append\(v_new\): dtype"),
    bad("v_cache_fp32", "mixed", lambda: append_call(cache()[0], cache()[1].float()), TypeError,
        r"kv_cache_append\(v_cache\): dtype torch.float32"),
    bad("k_new_meta", "device", lambda: append_call(k_new=torch.randn(CB, T, HKV, D, device="meta").half(),
                                                    v_new=torch.randn(CB, T, HKV, D, device="meta").half()),
        ValueError, r"kv_cache_append\(k_cache\): k_cache is on cpu but k_new is on meta"),
    bad("seqlens_meta", "device", lambda: append_call(seqlens=i32(1, 2).to("meta")), ValueError,
        r"kv_cache_append\(cache_seqlens\): cache_seqlens is on meta"),
    bad("k_new_cuda", "device", lambda: append_call(k_new=torch.randn(CB, T, HKV, D, device="cuda").half(),
                                                    v_new=torch.randn(CB, T, HKV, D, device="cuda").half()),
        ValueError, r"kv_cache_append\(k_cache\): k_cache is on cpu but k_new is on cuda", requires="cuda"),
    ok("all_meta", "device", lambda: append_call(*cache(device="meta"),
                                                 torch.randn(CB, T, HKV, D, device="meta").half(),
                                                 torch.randn(CB, T, HKV, D, device="meta").half(),
                                                 i32(1, 2).to("meta"))),
    bad("k_new_3d", "shape", lambda: append_call(k_new=torch.randn(CB, HKV, D).half(),
                                                 v_new=torch.randn(CB, HKV, D).half()),
        ValueError, r"kv_cache_append\(k_new\): expected 4 dims"),
    bad("v_new_shape", "shape", lambda: append_call(v_new=torch.randn(CB, T + 1, HKV, D).half()), ValueError,
        r"kv_cache_append\(v_new\): shape .* does not match k_new's"),
    bad("heads", "shape", lambda: append_call(k_new=torch.randn(CB, T, 1, D).half(),
                                              v_new=torch.randn(CB, T, 1, D).half()),
        ValueError, r"kv_cache_append\(k_new\): \(heads_kv, head_dim\) \(1, 16\) does not match the caches' \(2, 16\)"),
    bad("cache_batch", "shape", lambda: append_call(*cache(CB + 1)), ValueError,
        r"kv_cache_append\(k_cache\): batch 3 does not match k_new's 2"),
    bad("seqlens_shape", "shape", lambda: append_call(seqlens=i32(1, 2, 3)), ValueError,
        r"kv_cache_append\(cache_seqlens\): expected shape \(2,\)"),
    ok("new_tokens_0", "empty", lambda: append_call(k_new=torch.randn(CB, 0, HKV, D).half(), seqlens=i32(CS, 0))),
    ok("batch_0", "empty", lambda: append_call(*cache(0), torch.randn(0, T, HKV, D).half(), None, i32())),
    ok("into_view", "view", _append_into_view),
    ok("k_new_transposed", "view", lambda: append_call(k_new=torch.randn(CB, HKV, T, D).half().transpose(1, 2))),
    ok("k_new_expanded", "view", lambda: append_call(k_new=torch.randn(1, 1, HKV, D).half().expand(CB, T, -1, -1))),
    bad("cache_head_dim_strided", "view", lambda: append_call(cache(d=2 * D)[0][..., ::2], cache()[1]), ValueError,
        r"kv_cache_append\(k_cache\): must be contiguous in the last \(head_dim\) dimension"),
    ok("nan_stored_as_is", "nonfinite", lambda: append_call(k_new=_poison(torch.randn(CB, T, HKV, D).half(), (0, 1)))),
    ok("meta_past_2^31", "int32", lambda: append_call(*cache(1, BIG // (HKV * D) + 16, device="meta"),
                                                      torch.randn(1, T, HKV, D, device="meta").half(),
                                                      torch.randn(1, T, HKV, D, device="meta").half(),
                                                      i32(5).to("meta"))),
    ok("paged", "block_table", lambda: paged_append_call()),
    ok("paged_crossing_pages", "block_table", lambda: paged_append_call(seqlens=i32(15, 30))),
    bad("negative", "block_table", lambda: paged_append_call(i32(3, -1, 4, 1).view(2, 2), i32(15, 4)), ValueError,
        r"kv_cache_append\(block_table\): page index out of range \[0, 5\)"),
    bad("past_num_pages", "block_table", lambda: paged_append_call(i32(3, 0, 4, 7).view(2, 2)), ValueError,
        r"kv_cache_append\(block_table\): page index out of range \[0, 5\)"),
    bad("too_narrow", "block_table", lambda: paged_append_call(i32(3, 4).view(2, 1), i32(15, 2)), ValueError,
        r"kv_cache_append\(cache_seqlens\): .*15 \+ 2 new tokens.*the cache holds 16"),
    bad("past_capacity", "capacity", lambda: append_call(seqlens=i32(3, CS - 1)), ValueError,
        r"kv_cache_append\(cache_seqlens\): .*31 \+ 2 new tokens.*the cache holds 32"),
    bad("past_capacity_paged", "capacity", lambda: paged_append_call(seqlens=i32(31, 0)), ValueError,
        r"kv_cache_append\(cache_seqlens\): .*31 \+ 2 new tokens"),
    bad("new_tokens_past_capacity", "capacity", lambda: append_call(k_new=torch.randn(CB, CS + 1, HKV, D).half(),
                                                                    seqlens=i32(0, 0)), ValueError,
        r"kv_cache_append\(k_new\): cache too small: 33 new tokens, the cache holds 32 per sequence"),
    bad("seqlens_negative", "capacity", lambda: append_call(seqlens=i32(-2, 0)), ValueError,
        r"kv_cache_append\(cache_seqlens\): negative length -2"),
    bad("same_cache_twice", "value", lambda: append_call(*(2 * [cache()[0]])), ValueError,
        r"kv_cache_append\(v_cache\): must not share memory with k_cache"),
    bad("k_new_list", "type", lambda: append_call(k_new=[0.0], v_new=[0.0]), TypeError,
        r"kv_cache_append\(k_new\): expected a torch.Tensor"),
    # FlashAttention's append options: cache_batch_idx, cache_leftpad, rotary_cos / rotary_sin / rotary_interleaved
    ok("batch_idx_subset", "value", lambda: append_call(*cache(4), cache_batch_idx=i32(3, 1))),
    ok("batch_idx_permutation", "value", lambda: append_call(cache_batch_idx=i32(1, 0))),
    ok("batch_idx_same_row_apart", "value", lambda: append_call(*cache(1), seqlens=i32(20, 5),
                                                                cache_batch_idx=i32(0, 0))),
    ok("rotary", "value", lambda: append_call(**rotary())),
    ok("rotary_gptj_partial", "value", lambda: append_call(**rotary(half=3, rotary_interleaved=True))),
    ok("rotary_leftpad_batch_idx", "value", lambda: append_call(*cache(3), cache_batch_idx=i32(2, 0),
                                                                cache_leftpad=i32(5, 3), **rotary(rows=CS - 3))),
    ok("leftpad_without_rotary", "value", lambda: append_call(cache_leftpad=i32(5, 0))),
    ok("rotary_paged", "block_table", lambda: paged_append_call(seqlens=i32(15, 30), cache_leftpad=i32(15, 1),
                                                                **rotary(rotary_interleaved=True))),
    ok("rotary_fp32", "dtype", lambda: append_call(*(t.float() for t in cache()), torch.randn(CB, T, HKV, D),
                                                   **rotary(dtype=torch.float32))),
    ok("rotary_nan_k_new", "nonfinite", lambda: append_call(
        k_new=_poison(_poison(torch.randn(CB, T, HKV, D).half(), (0, 1, 0, 2)), (1, 0, 1, D - 1), float("inf")),
        **rotary(half=D // 2 - 2))),
    ok("rotary_k_new_transposed", "view", lambda: append_call(
        k_new=torch.randn(CB, HKV, T, D).half().transpose(1, 2), **rotary(rotary_interleaved=True))),
    ok("rotary_all_meta", "device", lambda: append_call(
        *cache(device="meta"), torch.randn(CB, T, HKV, D, device="meta").half(),
        torch.randn(CB, T, HKV, D, device="meta").half(), i32(1, 2).to("meta"),
        cache_leftpad=i32(0, 1).to("meta"), **rotary(device="meta"))),
    bad("batch_idx_int64", "dtype", lambda: append_call(cache_batch_idx=torch.tensor([0, 1])), TypeError,
        r"kv_cache_append\(cache_batch_idx\): dtype must be torch.int32, got torch.int64"),
    bad("batch_idx_shape", "shape", lambda: append_call(cache_batch_idx=i32(0, 1, 1)), ValueError,
        r"kv_cache_append\(cache_batch_idx\): expected shape \(2,\)"),
    bad("batch_idx_meta", "device", lambda: append_call(cache_batch_idx=i32(0, 1).to("meta")), ValueError,
        r"kv_cache_append\(cache_batch_idx\): cache_batch_idx is on meta but k_new is on cpu"),
    bad("batch_idx_past_rows", "value", lambda: append_call(cache_batch_idx=i32(0, 2)), ValueError,
        r"kv_cache_append\(cache_batch_idx\): row index 2 out of range \[0, 2\)"),
    bad("batch_idx_negative", "value", lambda: append_call(*cache(3), cache_batch_idx=i32(-1, 1)), ValueError,
        r"kv_cache_append\(cache_batch_idx\): row index -1 out of range \[0, 3\)"),
    bad("batch_idx_same_slots", "value", lambda: append_call(seqlens=i32(5, 6), cache_batch_idx=i32(1, 1)),
        ValueError, r"kv_cache_append\(cache_batch_idx\): sequences 0 and 1 both write cache row 1 at overlapping"),
    bad("batch_idx_paged", "block_table", lambda: paged_append_call(cache_batch_idx=i32(0, 1)), ValueError,
        r"kv_cache_append\(cache_batch_idx\): not supported with block_table"),
    bad("batch_idx_list", "type", lambda: append_call(cache_batch_idx=[0, 1]), TypeError,
        r"kv_cache_append\(cache_batch_idx\): expected a torch.Tensor"),
    bad("leftpad_int64", "dtype", lambda: append_call(cache_leftpad=torch.tensor([0, 1])), TypeError,
        r"kv_cache_append\(cache_leftpad\): dtype must be torch.int32"),
    bad("leftpad_shape", "shape", lambda: append_call(cache_leftpad=i32(1)), ValueError,
        r"kv_cache_append\(cache_leftpad\): expected shape \(2,\)"),
    bad("leftpad_past_seqlens", "value", lambda: append_call(cache_leftpad=i32(6, 0), **rotary()), ValueError,
        r"kv_cache_append\(cache_leftpad\): cache_leftpad\[0\] = 6 is past cache_seqlens\[0\] = 5"),
    bad("leftpad_negative", "value", lambda: append_call(cache_leftpad=i32(0, -1)), ValueError,
        r"kv_cache_append\(cache_leftpad\): negative value -1"),
    bad("cos_without_sin", "value", lambda: append_call(rotary_cos=rotary()["rotary_cos"]), ValueError,
        r"kv_cache_append\(rotary_sin\): rotary_cos was given without rotary_sin"),
    bad("sin_without_cos", "value", lambda: append_call(rotary_sin=rotary()["rotary_sin"]), ValueError,
        r"kv_cache_append\(rotary_cos\): rotary_sin was given without rotary_cos"),
    bad("rotary_fp32_for_fp16", "mixed", lambda: append_call(**rotary(dtype=torch.float32)), TypeError,
        r"kv_cache_append\(rotary_cos\): dtype torch.float32 does not match k_new's torch.float16"),
    bad("rotary_sin_bf16", "mixed", lambda: append_call(rotary_cos=rotary()["rotary_cos"],
                                                        rotary_sin=rotary(dtype=torch.bfloat16)["rotary_sin"]),
        TypeError, r"kv_cache_append\(rotary_sin\): dtype torch.bfloat16 does not match k_new's torch.float16"),
    bad("rotary_meta", "device", lambda: append_call(**rotary(device="meta")), ValueError,
        r"kv_cache_append\(rotary_cos\): rotary_cos is on meta but k_new is on cpu"),
    bad("rotary_3d", "shape", lambda: append_call(rotary_cos=torch.ones(1, CS, D // 2).half(),
                                                  rotary_sin=torch.ones(1, CS, D // 2).half()), ValueError,
        r"kv_cache_append\(rotary_cos\): expected 2 dims \(seqlen_ro, rotary_dim / 2\)"),
    bad("rotary_sin_shape", "shape", lambda: append_call(rotary_cos=rotary()["rotary_cos"],
                                                         rotary_sin=rotary(half=4)["rotary_sin"]), ValueError,
        r"kv_cache_append\(rotary_sin\): shape \(32, 4\) does not match rotary_cos's \(32, 8\)"),
    bad("rotary_dim_past_head_dim", "shape", lambda: append_call(**rotary(half=D)), ValueError,
        r"kv_cache_append\(rotary_cos\): rotary_dim = 2 \* 16 columns = 32 is larger than head_dim 16"),
    bad("rotary_dim_0", "shape", lambda: append_call(**rotary(half=0)), ValueError,
        r"kv_cache_append\(rotary_cos\): expected rotary_dim / 2 >= 1 columns"),
    bad("rotary_positions_past_rows", "capacity", lambda: append_call(**rotary(rows=20)), ValueError,
        r"kv_cache_append\(rotary_cos\): a new token's position 31 \(cache_seqlens \+ t\) is past rotary_cos's "
        r"20 rows"),
    bad("rotary_positions_past_rows_leftpad", "capacity",
        lambda: paged_append_call(cache_leftpad=i32(2, 1), **rotary(rows=30)), ValueError,
        r"kv_cache_append\(rotary_cos\): a new token's position 30 \(cache_seqlens - cache_leftpad \+ t\) is past"),
    bad("rotary_interleaved_int", "type", lambda: append_call(**rotary(rotary_interleaved=1)), TypeError,
        r"kv_cache_append\(rotary_interleaved\): expected a bool, got int"),
    bad("rotary_cos_list", "type", lambda: append_call(rotary_cos=[1.0], rotary_sin=[0.0]), TypeError,
        r"kv_cache_append\(rotary_cos\): expected a torch.Tensor"),
]


# ---- prune_24 ------------------------------------------------------------------------------------------------------
def golden_prune(w: torch.Tensor, norm=None) -> torch.Tensor:
    """Keep the 2 largest |w| (* norm) of every 4, ties to the lower column, element by element in Python."""
    out = torch.zeros_like(w)
    score = w.abs().double() * (1.0 if norm is None else norm.double().abs())
    for n in range(w.shape[0]):
        for g in range(w.shape[1] // 4):
            cols = sorted(range(4 * g, 4 * g + 4), key=lambda c: (-float(score[n, c]), c))[:2]
            out[n, cols] = w[n, cols]
    return out


def prune_call(w, method="magnitude", activation_norm=None) -> Call:
    def check(out, backend):
        if w.device.type == "meta":
            return assert_meta_like(out, w.shape, w.dtype)
        want = golden_prune(w, activation_norm if method == "wanda" else None)
        assert out.dtype == w.dtype and torch.equal(out.isnan(), want.isnan())
        assert torch.equal(out.nan_to_num(), want.nan_to_num()), "prune_24 differs from the golden pruning"
    before = w.clone() if isinstance(w, torch.Tensor) and w.device.type != "meta" else None

    def after():  # the input is never modified
        if before is not None:
            assert torch.equal(w.nan_to_num(), before.nan_to_num())
    return Call(lambda: tk.prune_24(w, method, activation_norm), check, after)


PRUNE_24 = [
    ok("fp32", "dtype", lambda: prune_call(torch.randn(6, 16))),
    ok("fp16_wanda", "dtype", lambda: prune_call(torch.randn(6, 16).half(), "wanda", torch.rand(16) * 3)),
    ok("bf16", "dtype", lambda: prune_call(torch.randn(6, 16).bfloat16())),
    bad("weight_int", "dtype", lambda: prune_call(torch.ones(6, 16, dtype=torch.int32)), TypeError,
        r"prune_24\(weight\): dtype must be float16, bfloat16 or float32"),
    bad("weight_fp64", "dtype", lambda: prune_call(torch.ones(6, 16, dtype=torch.float64)), TypeError,
        r"prune_24\(weight\): dtype"),
    bad("norm_int", "dtype", lambda: prune_call(torch.randn(6, 16), "wanda", torch.ones(16, dtype=torch.int64)),
        TypeError, r"prune_24\(activation_norm\): expected a float tensor"),
    ok("fp16_weight_fp64_norm", "mixed", lambda: prune_call(torch.randn(6, 16).half(), "wanda",
                                                            torch.rand(16, dtype=torch.float64))),
    bad("norm_meta", "device", lambda: prune_call(torch.randn(6, 16), "wanda", torch.rand(16, device="meta")),
        ValueError, r"prune_24\(activation_norm\): activation_norm is on meta but the weight is on cpu"),
    ok("meta", "device", lambda: prune_call(torch.empty(8, 16, device="meta"))),
    bad("weight_1d", "shape", lambda: prune_call(torch.randn(16)), ValueError, r"prune_24\(weight\): expected a 2-D"),
    bad("k_not_multiple_of_4", "shape", lambda: prune_call(torch.randn(6, 10)), ValueError,
        r"prune_24\(weight\): in_features=10 must be a multiple of 4"),
    bad("norm_shape", "shape", lambda: prune_call(torch.randn(6, 16), "wanda", torch.rand(8)), ValueError,
        r"prune_24\(activation_norm\): expected shape \(16,\)"),
    ok("rows_0", "empty", lambda: prune_call(torch.randn(0, 16))),
    ok("cols_0", "empty", lambda: prune_call(torch.randn(5, 0))),
    ok("transposed", "view", lambda: prune_call(torch.randn(16, 6).t())),
    ok("sliced", "view", lambda: prune_call(torch.randn(6, 32)[:, ::2])),
    ok("storage_offset", "view", lambda: prune_call(torch.randn(7, 16)[1:])),
    ok("norm_strided", "view", lambda: prune_call(torch.randn(6, 16), "wanda", torch.rand(32)[::2])),
    ok("inf_kept", "nonfinite", lambda: prune_call(_poison(torch.randn(6, 16), (2, 5), float("-inf")))),
    bad("weight_nan", "nonfinite", lambda: prune_call(_poison(torch.randn(6, 16), (2, 5))), ValueError,
        r"prune_24\(weight\): contains NaN"),
    bad("norm_nan", "nonfinite", lambda: prune_call(torch.randn(6, 16), "wanda", _poison(torch.rand(16), 3)),
        ValueError, r"prune_24\(activation_norm\): contains NaN"),
    ok("meta_past_2^31", "int32", lambda: prune_call(torch.empty(2 ** 16, 2 ** 16 + 4, device="meta"))),
    bad("method", "value", lambda: prune_call(torch.randn(6, 16), "random"), ValueError,
        r"prune_24\(method\): expected one of \('magnitude', 'wanda'\)"),
    bad("wanda_without_norm", "value", lambda: prune_call(torch.randn(6, 16), "wanda"), ValueError,
        r"prune_24\(activation_norm\): method='wanda' needs"),
    bad("norm_with_magnitude", "value", lambda: prune_call(torch.randn(6, 16), "magnitude", torch.rand(16)), ValueError,
        r"prune_24\(activation_norm\): only method='wanda'"),
    bad("weight_numpy", "type", lambda: prune_call(np.ones((4, 8), dtype=np.float32)), TypeError,
        r"prune_24\(weight\): expected a torch.Tensor"),
]


# ---- quantize_int4 and the Int4Weight constructor -------------------------------------------------------------------
def quantize_call(w, group_size=32, **kw) -> Call:
    """Any view or dtype must quantize exactly as its contiguous fp32 copy does (the same q, scales, offsets)."""
    def check(out, backend):
        assert isinstance(out, tk.Int4Weight)
        if w.device.type == "meta":
            return assert_meta_like(out.qweight, ((w.shape[1] + 7) // 8, w.shape[0]), torch.int32)
        again = tk.quantize_int4(w.contiguous(), group_size=group_size, **kw)
        for name in ("qweight", "scales", "offsets"):
            assert torch.equal(getattr(out, name), getattr(again, name)), name
        err = (out.dequantize(torch.float64) - w.double()).abs()
        assert bool((err <= out.scales.double().abs().max() * (0.5 + 2 ** -8)).all()), "a value off by > half a step"
    return Call(lambda: tk.quantize_int4(w, group_size=group_size, **kw), check)


QUANTIZE_INT4 = [
    ok("fp32", "dtype", lambda: quantize_call(torch.randn(8, 64))),
    ok("fp16_symmetric", "dtype", lambda: quantize_call(torch.randn(8, 64).half(), symmetric=True)),
    ok("bf16_per_channel", "dtype", lambda: quantize_call(torch.randn(8, 64).bfloat16(), group_size=-1)),
    bad("int", "dtype", lambda: quantize_call(torch.randint(0, 5, (8, 64))), TypeError,
        r"quantize_int4\(weight\): dtype must be float16, bfloat16 or float32"),
    bad("fp64", "dtype", lambda: quantize_call(torch.randn(8, 64, dtype=torch.float64)), TypeError,
        r"quantize_int4\(weight\): dtype must be float16, bfloat16 or float32"),
    bad("scale_dtype_int", "dtype", lambda: quantize_call(torch.randn(8, 64), scale_dtype=torch.int32), TypeError,
        r"quantize_int4\(scale_dtype\): must be float16, bfloat16 or float32"),
    ok("fp32_weight_fp16_scales", "mixed", lambda: quantize_call(torch.randn(8, 64), scale_dtype=torch.float16)),
    ok("meta", "device", lambda: quantize_call(torch.empty(8, 64, device="meta"))),
    bad("1d", "shape", lambda: quantize_call(torch.randn(64)), ValueError, r"quantize_int4\(weight\): must be 2-D"),
    ok("k_not_multiple_of_group", "shape", lambda: quantize_call(torch.randn(5, 72))),
    bad("rows_0", "empty", lambda: quantize_call(torch.empty(0, 64)),
        ValueError, r"quantize_int4\(weight\): must not be empty"),
    bad("cols_0", "empty", lambda: quantize_call(torch.empty(8, 0)),
        ValueError, r"quantize_int4\(weight\): must not be empty"),
    ok("transposed", "view", lambda: quantize_call(torch.randn(64, 8).t())),
    ok("sliced", "view", lambda: quantize_call(torch.randn(8, 128)[:, 1::2])),
    ok("storage_offset", "view", lambda: quantize_call(torch.randn(9, 64)[1:])),
    bad("nan", "nonfinite", lambda: quantize_call(_poison(torch.randn(8, 64), (1, 1))), ValueError,
        r"quantize_int4\(weight\): contains inf or NaN"),
    bad("inf", "nonfinite", lambda: quantize_call(_poison(torch.randn(8, 64), (1, 1), float("inf"))), ValueError,
        r"quantize_int4\(weight\): contains inf or NaN"),
    ok("meta_past_2^31", "int32", lambda: quantize_call(torch.empty(2 ** 16, 2 ** 15 + 64, device="meta"))),
    bad("group_0", "value", lambda: quantize_call(torch.randn(8, 64), group_size=0), ValueError,
        r"quantize_int4\(group_size\): must be a positive group size"),
    bad("group_-2", "value", lambda: quantize_call(torch.randn(8, 64), group_size=-2), ValueError,
        r"quantize_int4\(group_size\)"),
    bad("group_float", "type", lambda: quantize_call(torch.randn(8, 64), group_size=1.5), TypeError,
        r"quantize_int4\(group_size\): must be an int, got float"),
    bad("group_bool", "type", lambda: quantize_call(torch.randn(8, 64), group_size=True), TypeError,
        r"quantize_int4\(group_size\): must be an int, got bool"),
    bad("list", "type", lambda: quantize_call([[1.0]]), TypeError, r"quantize_int4\(weight\): expected a torch.Tensor"),
]


def _int4_parts(k=K, n=N, gs=32):
    w = make_weight(n, k, gs)
    return dict(qweight=w.qweight, scales=w.scales, offsets=w.offsets, group_size=gs, in_features=k, perm=None)


def int4_weight_call(**changes) -> Call:
    """Int4Weight(...) with some fields changed; an accepted weight must dequantize like its contiguous copy."""
    parts = _int4_parts()
    parts.update(changes)

    def check(out, backend):
        if out.device.type == "meta":
            return
        again = tk.Int4Weight(*(t.contiguous() if isinstance(t, torch.Tensor) else t for t in
                                (parts["qweight"], parts["scales"], parts["offsets"])),
                              parts["group_size"], parts["in_features"], perm=parts["perm"])
        assert torch.equal(out.dequantize().nan_to_num(), again.dequantize().nan_to_num())
    return Call(lambda: tk.Int4Weight(parts["qweight"], parts["scales"], parts["offsets"], parts["group_size"],
                                      parts["in_features"], perm=parts["perm"]), check)


_P = _int4_parts  # short, for the table
INT4_WEIGHT = [
    ok("fp16", "dtype", lambda: int4_weight_call()),
    ok("perm_int32", "dtype", lambda: int4_weight_call(perm=torch.randperm(K).int())),
    bad("qweight_int64", "dtype", lambda: int4_weight_call(qweight=_P()["qweight"].long()), TypeError,
        r"Int4Weight\(qweight\): qweight must be int32"),
    bad("scales_fp64", "dtype", lambda: int4_weight_call(scales=_P()["scales"].double()), TypeError,
        r"Int4Weight\(scales\): scales must be float16, bfloat16 or float32"),
    bad("perm_float", "dtype", lambda: int4_weight_call(perm=torch.arange(K).float()), TypeError,
        r"Int4Weight\(perm\): perm must be an int64 \(or int32\) tensor"),
    ok("offsets_fp32_scales_fp16", "mixed", lambda: int4_weight_call(offsets=_P()["offsets"].float())),
    ok("scales_bf16_offsets_fp16", "mixed", lambda: int4_weight_call(scales=_P()["scales"].bfloat16())),
    bad("scales_meta", "device", lambda: int4_weight_call(scales=_P()["scales"].to("meta")), ValueError,
        r"Int4Weight\(scales\): scales is on meta but qweight is on cpu"),
    bad("perm_meta", "device", lambda: int4_weight_call(perm=torch.arange(K, device="meta")), ValueError,
        r"Int4Weight\(perm\): perm is on meta"),
    ok("meta", "device", lambda: int4_weight_call(**{n: t.to("meta") for n, t in _P().items()
                                                     if isinstance(t, torch.Tensor)})),
    bad("to_cuda_without_cuda", "device", lambda: Call(lambda: make_weight(N, K, 32).to("cuda")), ValueError,
        r"Int4Weight.to\(device\): " + NO_CUDA, requires="nocuda"),
    bad("qweight_rows", "shape", lambda: int4_weight_call(qweight=_P()["qweight"][:-1]), ValueError,
        r"Int4Weight\(qweight\): qweight has 7 rows but in_features=64 needs ceil\(K/8\)=8"),
    bad("qweight_1d", "shape", lambda: int4_weight_call(qweight=_P()["qweight"].flatten()), ValueError,
        r"Int4Weight\(qweight\): qweight must be 2-D"),
    bad("scales_groups", "shape", lambda: int4_weight_call(scales=torch.ones(3, N)), ValueError,
        r"Int4Weight\(scales\): scales must have shape \(num_groups, out_features\) = \(2, 24\)"),
    bad("offsets_columns", "shape", lambda: int4_weight_call(offsets=torch.ones(2, N - 1)), ValueError,
        r"Int4Weight\(offsets\): offsets must have shape"),
    bad("perm_length", "shape", lambda: int4_weight_call(perm=torch.arange(K - 1)), ValueError,
        r"Int4Weight\(perm\): perm must be an int64 \(or int32\) tensor of shape \(64,\)"),
    ok("out_features_0", "empty", lambda: int4_weight_call(qweight=torch.zeros(8, 0, dtype=torch.int32),
                                                           scales=torch.ones(2, 0), offsets=torch.ones(2, 0))),
    bad("in_features_0", "empty", lambda: int4_weight_call(in_features=0), ValueError,
        r"Int4Weight\(in_features\): must be a positive int, got 0"),
    ok("qweight_transposed", "view", lambda: int4_weight_call(qweight=_P()["qweight"].t().contiguous().t())),
    ok("scales_storage_offset", "view", lambda: int4_weight_call(scales=torch.rand(3, N)[1:] + 0.1)),
    ok("perm_strided", "view", lambda: int4_weight_call(perm=torch.randperm(K).repeat_interleave(2)[::2])),
    ok("scales_nan", "nonfinite", lambda: int4_weight_call(scales=_poison(_P()["scales"], (0, 3)))),
    bad("perm_out_of_range", "value", lambda: int4_weight_call(perm=torch.arange(K) + 1), ValueError,
        r"Int4Weight\(perm\): must be a permutation of 0..63"),
    bad("perm_duplicates", "value", lambda: int4_weight_call(perm=torch.zeros(K, dtype=torch.int64)), ValueError,
        r"Int4Weight\(perm\): must be a permutation of 0..63"),
    bad("group_size_0", "value", lambda: int4_weight_call(group_size=0), ValueError, r"Int4Weight\(group_size\)"),
    bad("in_features_bool", "type", lambda: int4_weight_call(in_features=True), ValueError,
        r"Int4Weight\(in_features\): must be a positive int, got True"),
    bad("qweight_numpy", "type", lambda: int4_weight_call(qweight=np.zeros((8, N), dtype=np.int32)), TypeError,
        r"Int4Weight\(qweight\): qweight must be a torch.Tensor"),
]


# ---- importers ---------------------------------------------------------------------------------------------------
def _rng():
    return np.random.default_rng(int(torch.randint(0, 2 ** 31 - 1, ())))


def exact_check(golden_fn):
    """The imported weight must dequantize to the format's own formula (float64, rounded once to fp32), exactly;
    NaN where the formula gives NaN."""
    def check(out, backend):
        if out.device.type == "meta":
            return
        got, want = out.dequantize(), golden_fn().to(torch.float32)
        assert isinstance(out, tk.Int4Weight) and torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(), want.nan_to_num()), "differs from the format's formula"
    return check


def _apply(packed: dict, changes: dict) -> dict:
    """changes: name -> a tensor (replaces) or a function of the packed tensor (a view, a poisoned copy...)."""
    out = dict(packed)
    for name, change in changes.items():
        out[name] = change(packed[name]) if callable(change) else change
    return out


def gptq_call(act_order=False, **changes) -> Call:
    rng = _rng()
    q, zeros = rng.integers(0, 16, size=(K, 16)), rng.integers(0, 16, size=(2, 16))
    scales = torch.from_numpy(rng.uniform(0.01, 0.1, size=(2, 16))).half()
    g_idx = P.group_index(K, 32)
    if act_order:
        g_idx = g_idx[rng.permutation(K)]
    packed = _apply(P.pack_gptq(q, zeros, scales, g_idx), changes)
    return Call(lambda: tk.Int4Weight.from_gptq(packed["qweight"], packed["qzeros"], packed["scales"],
                                                packed["g_idx"]),
                exact_check(lambda: P.golden_zero_point(q, zeros, packed["scales"], g_idx)))


def awq_call(**changes) -> Call:
    rng = _rng()
    q, zeros = rng.integers(0, 16, size=(K, 16)), rng.integers(0, 16, size=(2, 16))
    scales = torch.from_numpy(rng.uniform(0.01, 0.1, size=(2, 16))).half()
    packed = _apply(P.pack_awq(q, zeros, scales), changes)
    return Call(lambda: tk.Int4Weight.from_awq(packed["qweight"], packed["qzeros"], packed["scales"]),
                exact_check(lambda: P.golden_zero_point(q, zeros, packed["scales"], P.group_index(K, 32))))


def ct_call(**changes) -> Call:
    rng = _rng()
    q, zp = rng.integers(-8, 8, size=(16, K)), rng.integers(-8, 8, size=(16, 2))
    scale = torch.from_numpy(rng.uniform(0.01, 0.1, size=(16, 2))).half()
    packed = _apply(P.pack_compressed_tensors(q, scale, zp), changes)
    return Call(lambda: tk.Int4Weight.from_compressed_tensors(packed["weight_packed"], packed["weight_scale"],
                                                              packed.get("weight_zero_point"), None,
                                                              packed["weight_shape"]),
                exact_check(lambda: P.golden_compressed_tensors(q, packed["weight_scale"], zp, P.group_index(K, 32))))


def gguf_call(kind="Q4_0", data=None, shape=(4, K)) -> Call:
    rng = _rng()
    q = rng.integers(0, 16, size=(4, K))
    d = rng.uniform(0.01, 0.1, size=(4, K // 32)).astype(np.float16)
    m = None if kind == "Q4_0" else rng.uniform(-1, 1, size=(4, K // 32)).astype(np.float16)
    raw = P.pack_gguf(q, d, m)
    data = raw if data is None else data(raw)
    return Call(lambda: tk.Int4Weight.from_gguf(data, kind, shape), exact_check(lambda: P.golden_gguf(q, d, m)))


def _transposed_view(t):
    return t.t().contiguous().t()


IMPORTERS = [
    ok("gptq", "dtype", lambda: gptq_call()),
    ok("gptq_act_order", "shape", lambda: gptq_call(act_order=True)),
    bad("gptq_qweight_int64", "dtype", lambda: gptq_call(qweight=lambda t: t.long()), TypeError,
        r"from_gptq\(qweight\): dtype must be int32"),
    bad("gptq_scales_int", "dtype", lambda: gptq_call(scales=lambda t: t.to(torch.int32)), TypeError,
        r"from_gptq\(scales\): dtype must be float16"),
    ok("gptq_scales_bf16", "mixed", lambda: gptq_call(scales=lambda t: t.bfloat16())),
    bad("gptq_scales_meta", "device", lambda: gptq_call(scales=lambda t: t.to("meta")), ValueError,
        r"from_gptq\(scales\): scales is on meta but qweight is on cpu"),
    bad("gptq_qzeros_shape", "shape", lambda: gptq_call(qzeros=lambda t: t[:1]), ValueError,
        r"from_gptq\(qzeros\): expected shape \[G, ceil\(N/8\)\]"),
    bad("gptq_empty", "empty", lambda: gptq_call(qweight=torch.zeros(0, 16, dtype=torch.int32)), ValueError,
        r"from_gptq\(qweight\): must not be empty"),
    ok("gptq_qweight_transposed_view", "view", lambda: gptq_call(qweight=_transposed_view)),
    ok("gptq_scales_storage_offset", "view", lambda: gptq_call(scales=lambda t: torch.cat([t[:1], t])[1:])),
    ok("gptq_scale_nan", "nonfinite", lambda: gptq_call(scales=lambda t: _poison(t, (1, 3)))),
    bad("gptq_g_idx_out_of_range", "value", lambda: gptq_call(g_idx=torch.full((K,), 5, dtype=torch.int32)),
        ValueError, r"from_gptq\(g_idx\): group indices must lie in \[0, 2\)"),
    bad("gptq_group_size", "value", lambda: Call(lambda: tk.Int4Weight.from_gptq(
        *(lambda p: (p["qweight"], p["qzeros"], p["scales"]))(P.pack_gptq(np.zeros((K, 16), int), np.ones((2, 16), int),
                                                                         torch.ones(2, 16).half(),
                                                                         P.group_index(K, 32))), group_size=0)),
        ValueError, r"from_gptq\(group_size\): must be a positive group size"),
    ok("awq", "dtype", lambda: awq_call()),
    bad("awq_qzeros_float", "dtype", lambda: awq_call(qzeros=torch.zeros(2, 2)), TypeError,
        r"from_awq\(qzeros\): dtype must be int32"),
    bad("awq_qweight_shape", "shape", lambda: awq_call(qweight=torch.zeros(K, 3, dtype=torch.int32)), ValueError,
        r"from_awq\(qweight\): expected shape \[K, ceil\(N/8\)\]"),
    ok("awq_scales_storage_offset", "view", lambda: awq_call(scales=lambda t: torch.cat([t[:1], t])[1:])),
    ok("awq_qweight_transposed_view", "view", lambda: awq_call(qweight=_transposed_view)),
    ok("ct", "dtype", lambda: ct_call()),
    bad("ct_scale_fp64", "dtype", lambda: ct_call(weight_scale=lambda t: t.double()), TypeError,
        r"from_compressed_tensors\(weight_scale\): dtype must be float16"),
    bad("ct_zero_point_meta", "device", lambda: ct_call(weight_zero_point=lambda t: t.to("meta")), ValueError,
        r"from_compressed_tensors\(weight_zero_point\): weight_zero_point is on meta"),
    bad("ct_weight_shape", "shape", lambda: ct_call(weight_shape=(16, K + 16)), ValueError,
        r"from_compressed_tensors\(weight_shape\)"),
    ok("ct_packed_transposed_view", "view", lambda: ct_call(weight_packed=_transposed_view)),
    ok("ct_nan_scale", "nonfinite", lambda: ct_call(weight_scale=lambda t: _poison(t, (3, 1)))),
    ok("gguf_q4_0", "dtype", lambda: gguf_call()),
    ok("gguf_q4_1_bytes", "dtype", lambda: gguf_call("Q4_1", data=lambda raw: raw.tobytes())),
    bad("gguf_data_int8", "dtype", lambda: gguf_call(data=lambda raw: torch.from_numpy(raw.copy()).to(torch.int8)),
        TypeError, r"from_gguf\(data\): expected the raw block bytes as uint8"),
    bad("gguf_data_length", "shape", lambda: gguf_call(data=lambda raw: raw[:-1]), ValueError,
        r"from_gguf\(data\): Q4_0 with shape"),
    bad("gguf_shape_0", "empty", lambda: gguf_call(shape=(0, K)), ValueError, r"from_gguf\(shape\)"),
    ok("gguf_data_strided_tensor", "view", lambda: gguf_call(data=lambda raw: torch.from_numpy(
        np.stack([raw, raw], 1).copy())[:, 0])),
    bad("gguf_type", "value", lambda: gguf_call("Q8_0"), ValueError, r"from_gguf\(ggml_type\): unsupported type"),
    bad("gguf_data_list", "type", lambda: gguf_call(data=lambda raw: list(raw)), TypeError,
        r"from_gguf\(data\): expected a uint8 torch.Tensor, numpy array or bytes"),
]


# ---- Sparse24Weight / Sparse24Int4Weight ---------------------------------------------------------------------------
def s24_roundtrip_call(dense, build=None) -> Call:
    """from_dense (or `build`) must give back the dense weight exactly (NaN/Inf included)."""
    def check(out, backend):
        if out.device.type == "meta":
            return assert_meta_like(out.values, (dense.shape[0], dense.shape[1] // 2), dense.dtype)
        back = out.to_dense()
        assert torch.equal(back.isnan(), dense.isnan()) and torch.equal(back.nan_to_num(), dense.nan_to_num())
    return Call(build or (lambda: tk.Sparse24Weight.from_dense(dense)), check)


def _pruned(dtype=torch.float32, n=8, k=32):
    return tk.prune_24(torch.randn(n, k)).to(dtype)


def _nan_pruned():
    w = _pruned()
    w[1, w[1].nonzero()[0, 0]] = float("nan")
    w[2, w[2].nonzero()[0, 0]] = float("inf")
    return w


def _strided_constructor_call() -> Call:
    dense = _pruned()
    w = tk.Sparse24Weight.from_dense(dense)
    return s24_roundtrip_call(dense, lambda: tk.Sparse24Weight(w.values.t().contiguous().t(),
                                                              w.meta.t().contiguous().t()))


def cutlass_call(values=None, meta=None) -> Call:
    good = tk.Sparse24Weight.from_dense(_pruned(torch.float16, 32, 64))
    v, m = good.to_cutlass()
    values = v if values is None else values(v)
    meta = m if meta is None else meta(m)

    def check(out, backend):
        assert torch.equal(out.to_dense(), good.to_dense())
    return Call(lambda: tk.Sparse24Weight.from_cutlass(values, meta), check)


SPARSE24_WEIGHT = [
    ok("from_dense_fp16", "dtype", lambda: s24_roundtrip_call(_pruned(torch.float16))),
    ok("from_dense_bf16", "dtype", lambda: s24_roundtrip_call(_pruned(torch.bfloat16))),
    bad("from_dense_int", "dtype", lambda: s24_roundtrip_call(torch.zeros(4, 8, dtype=torch.int32)), TypeError,
        r"Sparse24Weight.from_dense\(weight\): dtype must be float16, bfloat16 or float32"),
    bad("values_fp64", "dtype", lambda: Call(lambda: tk.Sparse24Weight(torch.zeros(8, 16, dtype=torch.float64),
                                                                      torch.full((8, 2), -4370, dtype=torch.int16))),
        TypeError, r"Sparse24Weight\(values\): values must be float16, bfloat16 or float32"),
    bad("meta_int32", "dtype", lambda: Call(lambda: tk.Sparse24Weight(torch.zeros(8, 16),
                                                                     torch.zeros(8, 2, dtype=torch.int32))),
        TypeError, r"Sparse24Weight\(meta\): meta must be int16"),
    bad("to_cutlass_fp32", "dtype", lambda: Call(lambda: tk.Sparse24Weight.from_dense(_pruned(n=32, k=64))
                                                 .to_cutlass()),
        TypeError, r"Sparse24Weight.to_cutlass\(\): needs float16 or bfloat16 values, got torch.float32.*1:2"),
    bad("from_cutlass_meta_int32", "dtype", lambda: cutlass_call(meta=lambda m: m.int()), TypeError,
        r"Sparse24Weight.from_cutlass\(meta_reordered\): needs int16"),
    bad("meta_on_meta_device", "device", lambda: Call(lambda: tk.Sparse24Weight(
        torch.zeros(8, 16), torch.full((8, 2), -4370, dtype=torch.int16, device="meta"))), ValueError,
        r"Sparse24Weight\(meta\): meta is on meta but values is on cpu"),
    bad("from_cutlass_meta_device", "device", lambda: cutlass_call(meta=lambda m: m.to("meta")), ValueError,
        r"Sparse24Weight.from_cutlass\(meta_reordered\): on meta but values is on cpu"),
    ok("from_dense_meta", "device", lambda: s24_roundtrip_call(torch.empty(8, 32, device="meta"))),
    bad("from_dense_1d", "shape", lambda: s24_roundtrip_call(torch.zeros(16)), ValueError,
        r"Sparse24Weight.from_dense\(weight\): expected a 2-D"),
    bad("from_dense_k_6", "shape", lambda: s24_roundtrip_call(torch.zeros(4, 6)), ValueError,
        r"Sparse24Weight.from_dense\(weight\): in_features must be a positive multiple of 4"),
    bad("meta_shape", "shape", lambda: Call(lambda: tk.Sparse24Weight(torch.zeros(8, 16),
                                                                     torch.full((8, 3), -4370, dtype=torch.int16))),
        ValueError, r"Sparse24Weight\(meta\): meta must have shape .* = \(8, 2\)"),
    bad("values_odd", "shape", lambda: Call(lambda: tk.Sparse24Weight(torch.zeros(8, 15),
                                                                     torch.full((8, 1), -4370, dtype=torch.int16))),
        ValueError, r"Sparse24Weight\(values\): values must have shape"),
    bad("to_cutlass_n_not_32", "shape", lambda: Call(lambda: tk.Sparse24Weight.from_dense(_pruned(torch.float16, 8, 64))
                                                     .to_cutlass()),
        ValueError, r"Sparse24Weight.to_cutlass\(\): .*out_features % 32 == 0"),
    bad("to_cutlass_k_48", "shape", lambda: Call(lambda: tk.Sparse24Weight.from_dense(_pruned(torch.float16, 32, 48))
                                                 .to_cutlass()),
        ValueError, r"Sparse24Weight.to_cutlass\(\): .*in_features % 32 == 0.*got \(32, 48\)"),
    bad("from_cutlass_k_48", "shape", lambda: Call(lambda: tk.Sparse24Weight.from_cutlass(
        torch.zeros(32, 24).half(), torch.zeros(32, 3, dtype=torch.int16))),
        ValueError, r"Sparse24Weight.from_cutlass\(values\): .*in_features % 32 == 0"),
    bad("from_cutlass_meta_shape", "shape", lambda: cutlass_call(meta=lambda m: m[:, :2]), ValueError,
        r"Sparse24Weight.from_cutlass\(meta_reordered\): expected shape \(32, 4\)"),
    bad("from_dense_rows_0", "empty", lambda: s24_roundtrip_call(torch.zeros(0, 8)), ValueError,
        r"Sparse24Weight.from_dense\(weight\): in_features must be a positive multiple of 4 and out_features positive"),
    ok("from_dense_transposed", "view", lambda: s24_roundtrip_call(_pruned(k=16).t().contiguous().t())),
    ok("from_dense_storage_offset", "view", lambda: s24_roundtrip_call(torch.cat([_pruned(n=1), _pruned()])[1:])),
    ok("constructor_strided", "view", lambda: _strided_constructor_call()),
    ok("from_cutlass_storage_offset", "view", lambda: cutlass_call(values=lambda v: torch.cat([v[:1], v])[1:])),
    ok("from_dense_nan_inf", "nonfinite", lambda: s24_roundtrip_call(_nan_pruned())),
    ok("from_dense_meta_past_2^31", "int32", lambda: s24_roundtrip_call(torch.empty(2 ** 16, 2 ** 15 + 16,
                                                                                    device="meta"))),
    bad("not_2_4", "value", lambda: s24_roundtrip_call(torch.ones(4, 8)), ValueError,
        r"Sparse24Weight.from_dense\(weight\): not 2:4 sparse: the group at \(row 0, column 0\)"),
    bad("meta_corrupt", "value", lambda: Call(lambda: tk.Sparse24Weight(torch.zeros(8, 16),
                                                                       torch.zeros(8, 2, dtype=torch.int16))),
        ValueError, r"Sparse24Weight\(meta\): meta is corrupt: the group at row 0, column 0"),
    bad("values_list", "type", lambda: Call(lambda: tk.Sparse24Weight([[0.0] * 16],
                                                                     torch.zeros(1, 2, dtype=torch.int16))),
        TypeError, r"Sparse24Weight\(values\): values must be a torch.Tensor"),
]


def s24i4_weight_call(**changes) -> Call:
    good = s24i4_weight(torch.float16)
    parts = _apply(dict(qweight=good.qweight, scales=good.scales, offsets=good.offsets, meta=good.meta, group_size=32,
                        in_features=K), changes)

    def check(out, backend):
        if out.device.type != "meta":
            assert torch.equal(out.dequantize(), good.dequantize())
    return Call(lambda: tk.Sparse24Int4Weight(**parts), check)


SPARSE24_INT4_WEIGHT = [
    ok("constructor", "dtype", lambda: s24i4_weight_call()),
    bad("meta_int32", "dtype", lambda: s24i4_weight_call(meta=lambda t: t.int()), TypeError,
        r"Sparse24Int4Weight\(meta\): meta must be int16"),
    bad("qweight_int64", "dtype", lambda: s24i4_weight_call(qweight=lambda t: t.long()), TypeError,
        r"Sparse24Int4Weight\(qweight\): qweight must be int32"),
    bad("scales_meta_device", "device", lambda: s24i4_weight_call(scales=lambda t: t.to("meta")), ValueError,
        r"Sparse24Int4Weight\(scales\): scales is on meta but qweight is on cpu"),
    bad("to_cuda_without_cuda", "device", lambda: Call(lambda: s24i4_weight().to("cuda")), ValueError,
        r"Sparse24Int4Weight.to\(device\): device='cuda' requested but torch.cuda.is_available\(\) is False",
        requires="nocuda"),
    bad("scales_shape", "shape", lambda: s24i4_weight_call(group_size=64), ValueError,
        r"Sparse24Int4Weight\(scales\): scales must have shape"),
    bad("meta_shape", "shape", lambda: s24i4_weight_call(meta=lambda t: t[:, :2]), ValueError,
        r"Sparse24Int4Weight\(meta\): meta must have shape"),
    bad("in_features_0", "empty", lambda: s24i4_weight_call(in_features=0), ValueError,
        r"Sparse24Int4Weight\(in_features\): must be a positive multiple of 4"),
    ok("meta_strided", "view", lambda: s24i4_weight_call(meta=_transposed_view, scales=_transposed_view)),
    bad("from_dense_nan", "nonfinite", lambda: Call(lambda: tk.Sparse24Int4Weight.from_dense(_nan_pruned())),
        ValueError, r"quantize_int4\(weight\): contains inf or NaN"),
    bad("group_size_odd", "value", lambda: Call(lambda: tk.Sparse24Int4Weight.from_dense(_pruned(), group_size=33)),
        ValueError, r"Sparse24Int4Weight.from_dense\(group_size\): .*multiple of 2"),
    bad("meta_corrupt", "value", lambda: s24i4_weight_call(meta=torch.zeros_like), ValueError,
        r"Sparse24Int4Weight\(meta\): meta is corrupt"),
    bad("from_sparse24_wrong_type", "type", lambda: Call(lambda: tk.Sparse24Int4Weight.from_sparse24(_pruned())),
        TypeError, r"Sparse24Int4Weight.from_sparse24\(weight\): expected a Sparse24Weight"),
]


# ---- nn modules ----------------------------------------------------------------------------------------------------
def module_call(make_module, x, golden_fn, operand=True) -> Call:
    """module(x) against golden_fn(module) -> (w64 (N, K), bias or None)."""
    holder = {}

    def run():
        holder["m"] = make_module()
        return holder["m"](x)

    def check(out, backend):
        w64, bias = golden_fn(holder["m"])
        bias = None if bias is None else bias.to(x.dtype)  # the layer adds its bias in x's dtype (documented)
        golden = x.double() @ w64.t() + (0 if bias is None else bias.double())
        assert_matches(out, golden, matmul_allowance(x, w64.t(), bias=bias,
                                                     operand_dtype=_opd(backend, x.dtype) if operand else None),
                       what="module")
    return Call(run, check)


def _int4_golden(m):
    return m.dequantize(torch.float64), None if m.bias is None else m.bias.detach()


def _s24_golden(m):
    return m.to_dense(torch.float64), None if m.bias is None else m.bias.detach()


def _lin(k=K, n=N, bias=True, dtype=torch.float32):
    return nn.Linear(k, n, bias=bias).to(dtype)


def mha_call(q, k=None, v=None, fused=True, mha_kw=None, **kw) -> Call:
    k = q if k is None else k
    v = k if v is None else v
    torch_mha = nn.MultiheadAttention(32, 4, batch_first=True, **(mha_kw or {})).eval()

    def check(out, backend):
        with torch.no_grad():
            want = torch_mha(q, k, v, need_weights=False, **kw)[0]
        ours = out[0]
        if not fused or q.dtype == torch.float64:
            torch.testing.assert_close(ours, want)
            return
        assert_matches(ours, want.double(), Allowance(1e-5 * (1 + want.abs().double())), what="mha")
    return Call(lambda: tk.nn.MultiheadAttention.from_module(torch_mha)(q, k, v, need_weights=False, **kw), check)


MODULES = [
    ok("int4_fp16", "dtype", lambda: module_call(lambda: tk.nn.Int4Linear.from_linear(_lin(dtype=torch.float16),
                                                                                      group_size=32),
                                                torch.randn(3, K).half(), _int4_golden)),
    bad("int4_dtype_int8", "dtype", lambda: Call(lambda: tk.nn.Int4Linear(K, N, dtype=torch.int8)), TypeError,
        r"Int4Linear\(dtype\): must be float16, bfloat16 or float32, got torch.int8"),
    bad("s24_dtype_fp64", "dtype", lambda: Call(lambda: tk.nn.Sparse24Linear(K, N, dtype=torch.float64)), TypeError,
        r"Sparse24Linear\(dtype\): must be float16, bfloat16 or float32"),
    bad("s24i4_dtype_int", "dtype", lambda: Call(lambda: tk.nn.Sparse24Int4Linear(K, N, dtype=torch.int32)), TypeError,
        r"Sparse24Int4Linear\(dtype\): must be float16, bfloat16 or float32"),
    ok("int4_bf16_input_fp32_layer", "mixed", lambda: module_call(lambda: tk.nn.Int4Linear.from_linear(_lin(), 32),
                                                                 torch.randn(2, K).bfloat16(), _int4_golden)),
    bad("s24_fp16_input_fp32_layer", "mixed", lambda: Call(lambda: tk.nn.Sparse24Linear.from_linear(_lin())(
        torch.randn(2, K).half())), TypeError, r"sparse24_linear\(x\): dtype torch.float16 does not match"),
    bad("int4_device_cuda", "device", lambda: Call(lambda: tk.nn.Int4Linear(K, N, device="cuda")), ValueError,
        r"Int4Linear\(device\): " + NO_CUDA, requires="nocuda"),
    bad("s24_device_cuda", "device", lambda: Call(lambda: tk.nn.Sparse24Linear(K, N, device="cuda:0")), ValueError,
        r"Sparse24Linear\(device\): device='cuda:0' requested but torch.cuda.is_available\(\) is False",
        requires="nocuda"),
    bad("s24i4_device_cuda", "device", lambda: Call(lambda: tk.nn.Sparse24Int4Linear(K, N,
                                                                                     device=torch.device("cuda"))),
        ValueError, r"Sparse24Int4Linear\(device\): " + NO_CUDA, requires="nocuda"),
    bad("mha_device_cuda", "device", lambda: Call(lambda: tk.nn.MultiheadAttention(32, 4, device="cuda")), ValueError,
        r"MultiheadAttention\(device\): " + NO_CUDA, requires="nocuda"),
    bad("int4_device_bad_string", "device", lambda: Call(lambda: tk.nn.Int4Linear(K, N, device="gpu")), ValueError,
        r"Int4Linear\(device\): expected a torch.device or a device string, got 'gpu'"),
    bad("int4_input_meta", "device", lambda: Call(lambda: tk.nn.Int4Linear.from_linear(_lin(), 32)(
        torch.randn(2, K, device="meta"))), ValueError, r"int4_linear\(x\): x is on meta"),
    ok("int4_on_meta", "device", lambda: Call(lambda: tk.nn.Int4Linear(K, N, device="meta"),
                                              lambda m, b: assert_meta_like(m.qweight, (K // 8, N), torch.int32))),
    bad("int4_in_features_0", "shape", lambda: Call(lambda: tk.nn.Int4Linear(0, N)), ValueError,
        r"Int4Linear\(in_features\): must be a positive int, got 0"),
    bad("int4_in_features_float", "type", lambda: Call(lambda: tk.nn.Int4Linear(64.0, N)), TypeError,
        r"Int4Linear\(in_features\): must be an int, got float"),
    bad("s24_in_features_6", "shape", lambda: Call(lambda: tk.nn.Sparse24Linear(6, N)), ValueError,
        r"Sparse24Linear\(in_features\): must be a positive multiple of 4, got 6"),
    bad("s24i4_out_features_0", "empty", lambda: Call(lambda: tk.nn.Sparse24Int4Linear(K, 0)), ValueError,
        r"Sparse24Int4Linear\(out_features\): must be a positive int, got 0"),
    bad("int4_input_wrong_width", "shape", lambda: Call(lambda: tk.nn.Int4Linear.from_linear(_lin(), 32)(
        torch.randn(2, K + 1))), ValueError, r"int4_linear\(x\): last dimension must be in_features=64"),
    ok("int4_empty_batch", "empty", lambda: module_call(lambda: tk.nn.Int4Linear.from_linear(_lin(), 32),
                                                        torch.randn(0, 3, K), _int4_golden)),
    ok("s24_transposed_input", "view", lambda: module_call(lambda: tk.nn.Sparse24Linear.from_linear(_lin()),
                                                           torch.randn(K, 3).t(), _s24_golden, operand=False)),
    ok("s24i4_storage_offset_input", "view", lambda: module_call(
        lambda: tk.nn.Sparse24Int4Linear.from_linear(_lin(), group_size=32), torch.randn(4, K)[1:],
        lambda m: (m.dequantize(torch.float64), m.bias.detach())), backends=("reference", "triton")),
    ok("mha_batch_first_view", "view", lambda: mha_call(torch.randn(6, 2, 32).transpose(0, 1)),
       backends=("reference", "triton")),
    ok("int4_nan_input", "nonfinite", lambda: module_call(lambda: tk.nn.Int4Linear.from_linear(_lin(), 32),
                                                          _poison(torch.randn(3, K), 1), _int4_golden)),
    ok("mha_nan_query", "nonfinite", lambda: mha_call(_poison(torch.randn(2, 5, 32), (0, 1))),
       backends=("reference", "triton")),
    bad("int4_from_linear_nan", "nonfinite", lambda: Call(lambda: tk.nn.Int4Linear.from_linear(
        nn.Linear(K, N).requires_grad_(False).apply(lambda m: m.weight.fill_(float("nan"))))), ValueError,
        r"quantize_int4\(weight\): contains inf or NaN"),
    bad("int4_group_size", "value", lambda: Call(lambda: tk.nn.Int4Linear.from_linear(_lin(), group_size=-4)),
        ValueError, r"Int4Linear.from_linear\(group_size\)"),
    bad("s24i4_group_size", "value", lambda: Call(lambda: tk.nn.Sparse24Int4Linear(K, N, group_size=3)), ValueError,
        r"Sparse24Int4Linear\(group_size\): .*multiple of 2"),
    bad("int4_from_linear_conv", "type", lambda: Call(lambda: tk.nn.Int4Linear.from_linear(nn.Conv1d(3, 3, 1))),
        TypeError, r"Int4Linear.from_linear\(linear\): expected an nn.Linear, got Conv1d"),
    bad("int4_from_weight_bias", "shape", lambda: Call(lambda: tk.nn.Int4Linear.from_weight(make_weight(N, K, 32),
                                                                                          torch.zeros(N + 1))),
        ValueError, r"Int4Linear.from_weight\(bias\): expected shape \(24,\)"),
    bad("s24_from_weight_type", "type", lambda: Call(lambda: tk.nn.Sparse24Linear.from_weight(make_weight(N, K, 32))),
        TypeError, r"Sparse24Linear.from_weight\(weight\): expected a Sparse24Weight"),
    bad("mha_from_module_type", "type", lambda: Call(lambda: tk.nn.MultiheadAttention.from_module(_lin())), TypeError,
        r"MultiheadAttention.from_module\(mha\): expected an nn.MultiheadAttention, got Linear"),
    ok("int4_from_linear_unchanged", "atomic", lambda: _from_linear_leaves_source()),
]


def _from_linear_leaves_source() -> Call:
    lin = _lin()
    before = copy.deepcopy(lin.state_dict())

    def check(out, backend):
        assert all(torch.equal(v, lin.state_dict()[k]) for k, v in before.items()), "the source layer changed"
    return Call(lambda: tk.nn.Int4Linear.from_linear(lin, group_size=32), check)


# ---- load_state_dict -----------------------------------------------------------------------------------------------
def _snapshot(m: nn.Module):
    return {k: (v.dtype, v.clone()) for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(m: nn.Module, snap) -> bool:
    now = {k: v for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    return now.keys() == snap.keys() and all(now[k].dtype == snap[k][0] and _bitwise_equal(now[k], snap[k][1])
                                             for k in snap)


def load_call(target, source_sd, strict=True, expect_from=None) -> Call:
    """target.load_state_dict(source_sd): on success the layer must compute what `expect_from` (the source layer)
    computes, exactly, with the target's own dtypes kept; on failure it must be bitwise unchanged."""
    snap = _snapshot(target)
    dtypes = {k: v.dtype for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}

    def check(out, backend):
        for name in ("scales", "values", "bias"):
            if name in dtypes and hasattr(target, name) and getattr(target, name) is not None:
                assert getattr(target, name).dtype == dtypes[name], f"{name}: dtype changed to " \
                                                                    f"{getattr(target, name).dtype}"
        if expect_from is not None:
            x = torch.randn(3, target.in_features)
            dt = target.values.dtype if hasattr(target, "values") else x.dtype
            want = expect_from.dequantize(torch.float64) if hasattr(expect_from, "dequantize") \
                else expect_from.to_dense(torch.float64)
            got = target.dequantize(torch.float64) if hasattr(target, "dequantize") else target.to_dense(torch.float64)
            assert torch.equal(got, want), "the loaded weight differs from the saved one"
            target(x.to(dt))

    def after():
        if not getattr(after, "succeeded", False):
            assert _same(target, snap), "the layer changed although loading failed"

    def run():
        res = target.load_state_dict(source_sd, strict=strict)
        after.succeeded = True
        return res
    return Call(run, check, after)


def _int4_layer(dtype=torch.float32, bias=True):
    return tk.nn.Int4Linear.from_linear(_lin(dtype=dtype, bias=bias), group_size=32)


def _sd_with(layer, **changes):
    sd = layer.state_dict()
    for k, v in changes.items():
        if v is None:
            del sd[k]
        else:
            sd[k] = v(sd[k]) if callable(v) else v
    return sd


def _fp16_into_fp32():
    src = _int4_layer(torch.float16)
    return load_call(tk.nn.Int4Linear(K, N, group_size=32), src.state_dict(), expect_from=src)


def _fp32_into_fp16_exact():
    """fp32 scales and offsets that fp16 holds exactly: the fp16 layer gets the same weight."""
    w = tk.quantize_int4(torch.randn(N, K).half(), 32)
    src = tk.nn.Int4Linear.from_weight(tk.Int4Weight(w.qweight, w.scales.float(), w.offsets.float(), 32, K),
                                       torch.zeros(N))
    return load_call(tk.nn.Int4Linear(K, N, group_size=32, dtype=torch.float16), src.state_dict(), expect_from=src)


LOAD_STATE_DICT = [
    ok("int4_fp16_into_fp32_keeps_fp32", "mixed", _fp16_into_fp32),
    ok("int4_fp32_into_fp16_keeps_fp16", "mixed", _fp32_into_fp16_exact),
    ok("s24_fp16_into_fp32_keeps_fp32", "mixed", lambda: (lambda src: load_call(
        tk.nn.Sparse24Linear(K, N), src.state_dict(), expect_from=src))(
        tk.nn.Sparse24Linear.from_linear(_lin(dtype=torch.float16)))),
    ok("s24i4_bf16_into_fp32_keeps_fp32", "mixed", lambda: (lambda src: load_call(
        tk.nn.Sparse24Int4Linear(K, N, group_size=32), src.state_dict(), expect_from=src))(
        tk.nn.Sparse24Int4Linear.from_linear(_lin(dtype=torch.bfloat16), group_size=32))),
    bad("int4_qweight_int64", "dtype", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(),
                                                                                 qweight=lambda t: t.long())),
        RuntimeError, r"Int4Linear.*Int4Weight\(qweight\): qweight must be int32"),
    bad("int4_scales_int", "dtype", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(),
                                                                             scales=lambda t: t.to(torch.int32))),
        RuntimeError, r"Int4Linear.*Int4Weight\(scales\): scales must be float16"),
    bad("s24_meta_int32", "dtype", lambda: (lambda l: load_call(l, _sd_with(l, meta=lambda t: t.int())))(
        tk.nn.Sparse24Linear.from_linear(_lin())),
        RuntimeError, r"Sparse24Linear.*Sparse24Weight\(meta\): meta must be int16"),
    ok("int4_meta_layer_takes_cpu_tensors", "device", lambda: (lambda src: load_call(
        tk.nn.Int4Linear(K, N, group_size=32, device="meta"), src.state_dict(), expect_from=src))(_int4_layer())),
    bad("int4_scales_shape", "shape", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(), scales=lambda t: t[:1])),
        RuntimeError, r"Int4Linear.*Int4Weight\(scales\): scales must have shape"),
    bad("int4_bias_shape", "shape", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(), bias=torch.zeros(N + 1))),
        RuntimeError, r"Int4Linear \(root\): load_state_dict\(bias\): bias has shape \(25,\), expected \(24,\)"),
    bad("int4_other_group_size", "shape", lambda: load_call(tk.nn.Int4Linear(K, N, group_size=64),
                                                            _int4_layer().state_dict()),
        RuntimeError, r"Int4Linear.*Int4Weight\(scales\): .*group_size=64"),
    bad("s24i4_qweight_columns", "shape", lambda: (lambda l: load_call(l, _sd_with(l, qweight=lambda t: t[:, :-1])))(
        tk.nn.Sparse24Int4Linear.from_linear(_lin(), group_size=32)), RuntimeError,
        r"Sparse24Int4Linear \(root\): load_state_dict\(qweight\): qweight has 23 columns"),
    bad("int4_missing_scales", "shape", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(), scales=None)),
        RuntimeError, r"Missing key\(s\) in state_dict: \"scales\""),
    bad("int4_missing_bias", "shape", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(), bias=None)),
        RuntimeError, r"Missing key\(s\) in state_dict: \"bias\""),
    bad("int4_unexpected_key", "shape", lambda: load_call(_int4_layer(), {**_int4_layer().state_dict(),
                                                                          "weight": torch.zeros(N, K)}),
        RuntimeError, r"Unexpected key\(s\) in state_dict: \"weight\""),
    bad("int4_partial_packed_not_strict", "shape", lambda: load_call(_int4_layer(),
                                                                     _sd_with(_int4_layer(), qweight=None),
                                                                     strict=False),
        RuntimeError, r"Int4Linear \(root\): load_state_dict\(qweight, scales, offsets, perm\): must be loaded "
                      r"together; missing qweight"),
    bad("s24i4_scales_empty", "empty", lambda: (lambda l: load_call(l, _sd_with(l, scales=lambda t: t[:0])))(
        tk.nn.Sparse24Int4Linear.from_linear(_lin(), group_size=32)), RuntimeError,
        r"Sparse24Int4Linear \(root\): Sparse24Int4Weight\(scales\): scales must have shape"),
    ok("int4_strided_tensors", "view", lambda: (lambda src: load_call(
        _int4_layer(), _sd_with(src, qweight=lambda t: t.t().contiguous().t(), scales=lambda t: t.t().contiguous().t()),
        expect_from=src))(_int4_layer())),
    ok("int4_nan_scales_load", "nonfinite", lambda: (lambda src: load_call(_int4_layer(), _sd_with(
        src, scales=lambda t: _poison(t, (0, 0)))))(_int4_layer())),
    bad("s24_meta_corrupt", "value", lambda: (lambda l: load_call(l, _sd_with(l, meta=torch.zeros(N, K // 16,
                                                                                               dtype=torch.int16))))(
        tk.nn.Sparse24Linear.from_linear(_lin())),
        RuntimeError, r"Sparse24Linear \(root\): Sparse24Weight\(meta\): meta is corrupt"),
    bad("int4_extra_state", "value", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(), _extra_state={"x": 1})),
        RuntimeError, r"Int4Linear \(root\): Int4Linear\(_extra_state\): unknown extra state"),
    bad("int4_bias_list", "type", lambda: load_call(_int4_layer(), _sd_with(_int4_layer(), bias=[0.0] * N)),
        RuntimeError, r"Int4Linear \(root\): load_state_dict\(bias\): expected a torch.Tensor, got list"),
]


# ---- model swaps ---------------------------------------------------------------------------------------------------
def _model(nan_in_last=False):
    m = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Sequential(nn.Linear(K, N), nn.Linear(N, N)))
    if nan_in_last:
        with torch.no_grad():
            m[2][1].weight[3, 3] = float("nan")
    return m


def swap_call(fn, model, *args, expect_names=None, **kw) -> Call:
    """fn(model): on success the model's outputs stay close; on failure every module is the same object, unchanged."""
    modules = dict(model.named_modules())
    snap = _snapshot(model)
    x = torch.randn(2, K)
    try:
        with torch.no_grad():
            y0 = model(x) if all(p.device.type != "meta" for p in model.parameters()) else None
    except (RuntimeError, ValueError):  # a deliberately corrupt layer (the module's plan names the bad buffer)
        y0 = None

    def check(out, backend):
        if expect_names is not None:
            assert sorted(out) == sorted(expect_names), out
        if y0 is not None and not any(torch.isnan(p).any() for p in model.parameters()):
            with torch.no_grad():
                torch.testing.assert_close(model(x), y0, rtol=0.1, atol=0.1)

    def after():
        if not getattr(after, "succeeded", False):
            assert dict(model.named_modules()) == modules, "a layer was swapped although the call failed"
            assert _same(model, snap), "a layer changed although the call failed"

    def run():
        out = fn(model, *args, **kw)
        after.succeeded = True
        return out
    return Call(run, check, after)


def _quantized(nan_in_last=False):
    m = _model()
    tk_model.quantize_int4_(m, group_size=32)
    if nan_in_last:  # a corrupt layer: scales of the wrong shape (a bad checkpoint loaded around the checks)
        m[2][1]._buffers["scales"] = m[2][1].scales[:, :1]
    return m


MODEL = [
    ok("quantize", "dtype", lambda: swap_call(tk_model.quantize_int4_, _model(), group_size=32,
                                              expect_names=["0", "2.0", "2.1"])),
    ok("quantize_fp16_model", "dtype", lambda: swap_call(tk_model.quantize_int4_, _model().half(), group_size=32)),
    ok("restore", "dtype", lambda: swap_call(tk_model.restore_, _quantized(), expect_names=["0", "2.0", "2.1"])),
    ok("quantize_meta_model", "device", lambda: swap_call(tk_model.quantize_int4_, _model().to("meta"), group_size=32)),
    ok("quantize_no_linear", "empty", lambda: swap_call(tk_model.quantize_int4_, nn.Sequential(nn.ReLU()),
                                                        expect_names=[])),
    ok("quantize_transposed_weight", "view", lambda: swap_call(tk_model.quantize_int4_, (lambda m: (
        setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().t().contiguous().t())), m)[1])(_model()),
        group_size=32)),
    bad("quantize_nan_in_last_layer", "atomic", lambda: swap_call(tk_model.quantize_int4_, _model(nan_in_last=True),
                                                                  group_size=32),
        ValueError, r"quantize_int4_\(model\): layer '2.1': quantize_int4\(weight\): contains inf or NaN"),
    bad("restore_corrupt_last_layer", "atomic", lambda: swap_call(tk_model.restore_, _quantized(nan_in_last=True)),
        ValueError, r"restore_\(model\): layer '2.1': Int4Weight\(scales\): scales must have shape"),
    bad("quantize_group_size", "value", lambda: swap_call(tk_model.quantize_int4_, _model(), group_size=0),
        ValueError, r"quantize_int4_\(group_size\): must be a positive group size"),
    bad("quantize_exclude_str", "type", lambda: swap_call(tk_model.quantize_int4_, _model(), exclude="lm_head"),
        TypeError, r"quantize_int4_\(exclude\): expected an iterable of fnmatch patterns \(str\), got str"),
    bad("quantize_include_not_callable", "type", lambda: swap_call(tk_model.quantize_int4_, _model(), include=True),
        TypeError, r"quantize_int4_\(include\): expected a callable \(name, layer\) -> bool, got bool"),
    bad("quantize_not_module", "type", lambda: Call(lambda: tk_model.quantize_int4_("model")), TypeError,
        r"quantize_int4_\(model\): expected an nn.Module, got str"),
    bad("restore_not_module", "type", lambda: Call(lambda: tk_model.restore_([])), TypeError,
        r"restore_\(model\): expected an nn.Module, got list"),
]


# ---- CLI -----------------------------------------------------------------------------------------------------------
class CliError(Exception):
    """A CLI run that ended with a nonzero status: the message is its status and stderr."""


def cli_call(*argv) -> Call:
    def run():
        from turbokernels import cli
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli.main(list(argv))
        except SystemExit as exc:
            rc = exc.code
        if rc:
            raise CliError(f"exit {rc}: {err.getvalue()}")
        return out.getvalue()

    def check(out, backend):
        assert "turbokernels" in out
    return Call(run, check)


CLI = [
    ok("info", "value", lambda: cli_call("info")),
    bad("demo_device_cuda", "device", lambda: cli_call("demo", "--device", "cuda"), CliError,
        r"exit 2: turbokernels demo: error: demo\(device\): " + NO_CUDA, requires="nocuda"),
    bad("demo_device_mps", "device", lambda: cli_call("demo", "--device", "mps"), CliError,
        r"(?s)exit 2: .*argument --device: invalid choice: 'mps'"),
    bad("demo_group_size_0", "value", lambda: cli_call("demo", "--group-size", "0"), CliError,
        r"exit 2: turbokernels demo: error: demo\(group_size\): must be a positive group size .* or -1 for "
        r"per-channel, got 0"),
    bad("demo_group_size_text", "type", lambda: cli_call("demo", "--group-size", "big"), CliError,
        r"(?s)exit 2: .*argument --group-size: invalid int value: 'big'"),
    bad("demo_model", "value", lambda: cli_call("demo", "--model", "gpt5"), CliError,
        r"(?s)exit 2: .*argument --model: invalid choice: 'gpt5'"),
    bad("bench_unknown", "value", lambda: cli_call("bench", "int8"), CliError,
        r"(?s)exit 2: .*argument name: invalid choice: 'int8'"),
    bad("no_command", "value", lambda: cli_call(),
        CliError, r"(?s)exit 2: .*the following arguments are required: command"),
]


ENTRIES = [
    Entry("int4_linear", INT4_LINEAR, ("reference", "cpu", "triton")),
    Entry("sparse24_linear", SPARSE24_LINEAR, ("reference", "cpu", "triton")),
    Entry("sparse24_int4_linear", SPARSE24_INT4_LINEAR, ("reference", "cpu", "triton")),
    Entry("attention", ATTENTION, ("reference", "triton", "torch")),
    Entry("scaled_dot_product_attention", SDPA, ("reference", "triton", "torch")),
    Entry("decode_attention", DECODE, ("reference", "triton", "torch", "cpu")),
    Entry("kv_cache_append", KV_CACHE_APPEND, ("reference", "triton"), unchanged="both caches, bitwise"),
    Entry("prune_24", PRUNE_24, unchanged="the input weight"),
    Entry("quantize_int4", QUANTIZE_INT4),
    Entry("Int4Weight", INT4_WEIGHT),
    Entry("importers (from_gptq/awq/compressed_tensors/gguf)", IMPORTERS),
    Entry("Sparse24Weight (+ from_dense, to/from_cutlass)", SPARSE24_WEIGHT),
    Entry("Sparse24Int4Weight", SPARSE24_INT4_WEIGHT),
    Entry("nn modules", MODULES, ("reference", "cpu", "triton")),
    Entry("load_state_dict", LOAD_STATE_DICT, unchanged="the layer's tensors and dtypes, bitwise"),
    Entry("model.quantize_int4_ / restore_", MODEL, unchanged="every layer object and tensor of the model"),
    Entry("CLI", CLI),
]


def _backends_of(entry: Entry, case: Case) -> tuple:
    return case.backends if case.backends is not None else entry.backends


def _params():
    for entry in ENTRIES:
        short = entry.name.split(" ")[0]
        for case in entry.cases:
            for b in _backends_of(entry, case):
                yield pytest.param(entry.name, case, b,
                                   id=f"{short}-{case.category}-{case.id}" + (f"-{b}" if b else ""))


@pytest.mark.parametrize("entry,case,backend", list(_params()))
def test_entry(entry, case, backend, request):
    if case.requires == "cuda" and not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    if case.requires == "nocuda" and HAS_CUDA:
        pytest.skip("checks the error on a machine without CUDA")
    reason = _backend_skip(backend)
    if reason:
        pytest.skip(reason)
    if case.xfail and backend in case.xfail:
        request.applymarker(pytest.mark.xfail(reason=case.xfail[backend], strict=True))
    call = case.build()
    ctx = tk.backend(backend) if backend else contextlib.nullcontext()
    try:
        if case.expect == OK:
            with ctx:
                result = call.fn()
            if call.check is not None:
                call.check(result, backend)
        else:
            exc, regex = case.expect
            with ctx, pytest.raises(exc, match=regex):
                call.fn()
    finally:
        if call.after is not None:
            call.after()


def test_every_case_id_is_unique_and_every_error_names_its_entry():
    for entry in ENTRIES:
        ids = [c.id for c in entry.cases]
        assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]
        for c in entry.cases:
            if c.expect != OK:  # entry(argument), torch's key messages, argparse's, or a forced backend's refusal
                assert any(m in c.expect[1] for m in (r"\(", "invalid", "Missing", "Unexpected", "required",
                                                      "'triton'")), (entry.name, c.id, c.expect[1])


# ---- compile and CUDA-only checks that the table cannot express -----------------------------------------------------
def test_value_checks_keep_torch_compile_fullgraph():
    """The always-on cu_seqlens / cache_seqlens / block_table checks trace (torch._assert_async while compiling)."""
    q, k, v, cu_q, cu_k = varlen(dtype=torch.float32)
    kc, vc, bt = paged_cache(dtype=torch.float32)

    def fn(q, k, v, cu_q, cu_k, kc, vc, bt, lens):
        o = tk.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
        new = tk.kv_cache_append(kc, vc, q[:2, :HKV].unsqueeze(1), q[:2, :HKV].unsqueeze(1), lens, block_table=bt)
        return o, tk.decode_attention(q[:2, None], kc, vc, new, block_table=bt)

    args = (q, k, v, cu_q, cu_k, kc.clone(), vc.clone(), bt, i32(9, 30))
    expected = fn(*args[:5], kc.clone(), vc.clone(), *args[7:])
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*args)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    with pytest.raises(RuntimeError, match=r"attention\(cu_seqlens_q\)"):
        compiled(q, k, v, i32(0, 3, 2, 7), *args[4:])


@pytest.mark.gpu
def test_cuda_value_checks_assert_on_the_device_without_a_sync():
    """On CUDA a bad cu_seqlens is a device-side assert (fatal to the CUDA context, as FlashAttention's debug checks
    are), so it runs in a child process; a good call makes no host sync (checked with torch's sync debug mode)."""
    import subprocess
    code = ("import torch, turbokernels as tk\n"
            "q = torch.randn(7, 4, 16, device='cuda', dtype=torch.float16)\n"
            "cu = torch.tensor([0, 3, 7], dtype=torch.int32, device='cuda')\n"
            "torch.cuda.set_sync_debug_mode('error')\n"
            "tk.attention(q, q[:, :2], q[:, :2], cu_seqlens_q=cu, cu_seqlens_k=cu)\n"
            "torch.cuda.set_sync_debug_mode(0)\n"
            "print('good call: no host sync', flush=True)\n"
            "bad = torch.tensor([0, 5, 3], dtype=torch.int32, device='cuda')\n"
            "tk.attention(q, q[:, :2], q[:, :2], cu_seqlens_q=bad, cu_seqlens_k=cu)\n"
            "torch.cuda.synchronize()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    # the message is printed by torch versions whose CUDA _assert_async keeps it; all report the device-side assert
    assert res.returncode != 0 and ("cu_seqlens_q" in res.stderr or "device-side assert" in res.stderr), \
        res.stderr[-2000:]
    assert "good call: no host sync" in res.stdout, res.stderr[-2000:]


# ---- counts for docs/reliability.md ------------------------------------------------------------------------------
def counts_markdown() -> str:
    head = "| entry | cases | ok | refused | runs | " + " | ".join(CATEGORIES) + " |"
    lines = [head, "|" + "---|" * (5 + len(CATEGORIES))]
    total = dict(cases=0, ok=0, bad=0, runs=0)
    per_cat_total = {c: [0, 0] for c in CATEGORIES}
    for entry in ENTRIES:
        per_cat = {c: [0, 0] for c in CATEGORIES}
        n_ok = sum(c.expect == OK for c in entry.cases)
        runs = sum(len(_backends_of(entry, c)) for c in entry.cases)
        for c in entry.cases:
            per_cat[c.category][0 if c.expect == OK else 1] += 1
            per_cat_total[c.category][0 if c.expect == OK else 1] += 1
        cells = [f"{a}/{b}" if a + b else "–" for a, b in per_cat.values()]
        lines.append(f"| {entry.name} | {len(entry.cases)} | {n_ok} | {len(entry.cases) - n_ok} | {runs} | "
                     + " | ".join(cells) + " |")
        for k, v in (("cases", len(entry.cases)), ("ok", n_ok), ("bad", len(entry.cases) - n_ok), ("runs", runs)):
            total[k] += v
    cells = [f"{a}/{b}" if a + b else "–" for a, b in per_cat_total.values()]
    lines.append(f"| **all** | **{total['cases']}** | **{total['ok']}** | **{total['bad']}** | **{total['runs']}** | "
                 + " | ".join(cells) + " |")
    cuda = sum(c.requires == "cuda" for e in ENTRIES for c in e.cases)
    nocuda = sum(c.requires == "nocuda" for e in ENTRIES for c in e.cases)
    xfail = [(e.name, c.id, b) for e in ENTRIES for c in e.cases for b in (c.xfail or {})]

    def checked_after(e):  # refusals whose call checks afterwards that nothing changed (builds them: small)
        return sum(c.expect != OK and c.requires != "cuda" and c.build().after is not None for c in e.cases)
    unchanged = "; ".join(f"{e.name}: {checked_after(e)} refusals ({e.unchanged})" for e in ENTRIES if e.unchanged)
    return "\n".join(lines) + (
        f"\n\nCategory cells are ok/refused; runs = cases x the entry's backends (reference, cpu, triton under "
        f"TRITON_INTERPRET=1; fewer where a case names its backends). {cuda} cases need a CUDA GPU (skipped without "
        f"one); {nocuda} check the error on a machine without CUDA (skipped with one). Refusals that also check, "
        f"after the call, that nothing was left half-changed: {unchanged}. Known divergences "
        f"pinned as strict xfails: " + (", ".join(f"{n} {i} on {b}" for n, i, b in xfail) or "none") + ".")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", action="store_true", help="print the per-entry counts as a markdown table")
    if parser.parse_args().counts:
        print(counts_markdown())

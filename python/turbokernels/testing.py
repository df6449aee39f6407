"""Test helpers shared by tests/ and bench/: the tolerance rule and the static code-generation check.

The tolerance rule
------------------
Every kernel is compared with a float64 golden result (the spec run in float64 on the exact inputs). The error each
output element may have is derived from the computation, element by element; it depends on the kernel's arithmetic
(which dtype each operand is rounded to, how long each reduction is, the accumulator's dtype) and on the inputs,
never on which CPU or BLAS runs the test:

    |ours_i - golden_i| <= half_ulp_out(|golden_i| + a_i) + a_i                                            (1)

    half_ulp_out(y)  one rounding of the output to its dtype (round to nearest: at most half a unit in the last
                     place of y): the error every kernel makes, and all that a correct fp16/bf16 kernel may add
                     when nothing else is rounded
    a_i              what the computation may add before that rounding, for a sum of n terms t_k:
                       accumulation in fp32, any order:   LAMBDA * sqrt(n) * u_acc * sum_k |t_k|
                       one operand a_k of t_k = a_k b_k rounded to a dtype of unit roundoff u_op before the product
                       (a tensor-core dot of fp16/bf16 operands: the dequantized int4 weight, the softmax
                       probabilities, dS): LAMBDA * sqrt(sum_k (max(u_op |a_k|, eta) b_k)^2), eta = half the
                       spacing of the dtype's subnormals (probabilities below fp16's smallest normal number)
                       an int4 weight dequantized in fp32: LAMBDA * sqrt(sum_k (u32 b_k sum_r m_rk)^2), m_rk the
                       magnitude the backend's rounding r of weight k sees (q s, w; the C++ kernel's s (q - 8),
                       o + 8 s: int4_dequant_magnitudes), larger than |w_k| where q s and o cancel
                       an fp32 result below fp32's smallest normal number: ETA32 = 2^-150 absolute per rounding
                       (the attention backward's underflowing probabilities)
                     (u = 2^-p: 2^-24 for fp32, 2^-11 fp16, 2^-8 bf16.)

The sqrt(n) forms are Higham & Mary's probabilistic rounding-error bounds (SIAM J. Sci. Comput. 41(5), 2019):
rounding errors that are independent and of mean zero give |error| <= LAMBDA sqrt(n) u sum|t_k| with probability
at least 1 - 2 exp(-LAMBDA^2 / 2) per element (LAMBDA = 6: 3e-8), where the worst case n u sum|t_k| is too loose
to catch a wrong kernel once n is large. The operand term is Hoeffding's inequality on sum_k delta_k b_k with
|delta_k| <= max(u_op |a_k|, eta), same probability: the tests' b_k are random with random signs, which makes the
terms independent and of mean zero even where a_k repeats (an int4 group has 16 distinct weights).
attention_allowance adds the propagation of the score errors through the softmax; attention_bwd_allowance follows
dS = P (dP - D) through each of the backward's matmuls.

A second check is FlashAttention's: for fp16/bf16 outputs the largest error may be at most `factor` (2) times the
largest error of torch computing the same thing in that dtype (the baseline), plus one output rounding of the
largest element and the fp32 accumulation allowance (the part torch's summation order need not share). It is
skipped for fp32 outputs, where torch's error is nothing but the accident of its BLAS's summation order (it differs
between an AMD EPYC and an Intel Xeon: a bound built on it moves with the machine), and when torch's error is 0.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import subprocess
import tempfile
from typing import Optional, Sequence, Union

import torch


# ---- tolerance -------------------------------------------------------------------------------------------------
LAMBDA = 6.0
_UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                  torch.bfloat16: 2.0 ** -8}
# smallest normal exponent: below it the spacing of the dtype stops shrinking
_MIN_EXPONENT = {torch.float64: -1022, torch.float32: -126, torch.float16: -14, torch.bfloat16: -126}
U32 = _UNIT_ROUNDOFF[torch.float32]
# half the spacing of fp32's subnormal numbers: the largest absolute error of one fp32 rounding of a result below the
# smallest normal number (where the relative bound u32 |y| no longer holds); the fp32 counterpart of the operand
# dtypes' eta (_operand_rounding)
ETA32 = U32 * 2.0 ** _MIN_EXPONENT[torch.float32]


@functools.lru_cache(maxsize=None)
def _cpu_has_amx_bf16() -> bool:
    """AVX-512 and AMX-BF16 (csrc/cpu/cpu_isa.h's kAmxBf16Isa), from /proc/cpuinfo (False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return all(f in flags for f in ("amx_bf16", "amx_tile", "avx512bw", "avx512_bf16"))


def cpu_isa_caps() -> list[str]:
    """The TURBOKERNELS_CPU_ISA values whose C++ kernel paths differ on this CPU ("best" = none set): a cap above what
    the CPU has gives its best, so "avx512" is listed only where the best is more (AVX-512 + AMX-BF16, which sends
    int4_mm's bf16 x at M >= 12 through AMX tiles and fp32 x at M > 96 through sgemm)."""
    return ["best", "avx2", "scalar"] + (["avx512"] if _cpu_has_amx_bf16() else [])


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p: rounding to nearest in `dtype` changes a value by at most u times its size."""
    return _UNIT_ROUNDOFF[dtype]


def half_ulp(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half a unit in the last place of |y| in `dtype` (float64 in, float64 out): the largest error of rounding a
    value of that size to nearest; constant below the smallest normal number."""
    y = y.to(torch.float64).abs()
    _, exponent = torch.frexp(y)  # y = m 2^e, m in [0.5, 1): the binade of y starts at 2^(e - 1)
    exponent = torch.clamp(exponent - 1, min=_MIN_EXPONENT[dtype])
    return torch.ldexp(torch.full_like(y, unit_roundoff(dtype)), exponent)


@dataclasses.dataclass
class Allowance:
    """What a computation may add to each output element before its final rounding (float64, broadcastable to
    the output): `accumulation` (fp32 sums in any order, scalar multiplies, exp/log) and `operand` (operands rounded
    to a narrower dtype before a product, an error torch's same-dtype computation makes as well)."""
    accumulation: Union[torch.Tensor, float] = 0.0
    operand: Union[torch.Tensor, float] = 0.0

    @property
    def total(self):
        return self.accumulation + self.operand

    def __add__(self, other: "Allowance") -> "Allowance":
        return Allowance(self.accumulation + other.accumulation, self.operand + other.operand)

    def map(self, fn) -> "Allowance":
        """The same allowance with `fn` applied to both parts (a reshape, an index)."""
        wrap = (lambda t: fn(t) if isinstance(t, torch.Tensor) else t)
        return Allowance(wrap(self.accumulation), wrap(self.operand))


def _operand_rounding(operand_dtype: Optional[torch.dtype]) -> tuple[float, float]:
    """(u, eta) of the dtype operands are rounded to: rounding a changes it by at most max(u |a|, eta), eta being
    half the spacing of its subnormal numbers (fp16: 2^-25, which softmax probabilities reach). (0, 0) when
    nothing is rounded below fp32 (operand_dtype None or fp32)."""
    if operand_dtype is None or unit_roundoff(operand_dtype) <= U32:
        return 0.0, 0.0
    u = unit_roundoff(operand_dtype)
    return u, u * 2.0 ** _MIN_EXPONENT[operand_dtype]


def _operand_term(rounding: tuple[float, float], ab_sq: torch.Tensor, b_sq_nonzero: torch.Tensor):
    """LAMBDA sqrt(sum_k (delta_k b_k)^2) with |delta_k| <= max(u |a_k|, eta) for a rounded operand a, an exact b:
    ab_sq = sum_k (a_k b_k)^2, b_sq_nonzero = sum over the k where a_k != 0 of b_k^2 (a zero is rounded exactly)."""
    u, eta = rounding
    if not u:
        return torch.zeros_like(ab_sq)
    return LAMBDA * (u * u * ab_sq + eta * eta * b_sq_nonzero).sqrt()


def matmul_allowance(x: torch.Tensor, w_kn: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                     operand_dtype: Optional[torch.dtype] = None,
                     dequant_magnitudes: Optional[Sequence[torch.Tensor]] = None) -> Allowance:
    """x (..., K) @ w (K, N) [+ bias] accumulated in fp32 in any order, the bias added in fp32 before the one
    rounding of the output; the weight rounded to `operand_dtype` before the dot (an int4 weight dequantized in
    fp32 and fed to a tensor core; None: used as it is, or rounded no coarser than fp32). x and w_kn are the exact
    values (float64 is best: an int4 weight's exact q * scale + offset).

    dequant_magnitudes: the (K, N) magnitudes the fp32 dequantization of each weight rounds, one tensor per
    rounding (each changes the weight by at most u32 times its magnitude; int4: int4_dequant_magnitudes, per
    backend). Default (|w|, |w|): two roundings relative to the weight itself. Where the dequantization's terms
    cancel (q * s and o, a weight near 0 in a group far from 0) they are much larger than |w|."""
    x64 = x.reshape(-1, x.shape[-1]).to(torch.float64)
    w64 = w_kn.to(torch.float64)
    K = x64.shape[-1]
    abs_sum = x64.abs() @ w64.abs()
    x_sq = x64 * x64
    # fp32 sums; the rounding of x (and of the product) counts as one operand rounding at fp32, relative to |w|,
    # and each rounding of the dequantization as one more, relative to its magnitude (summed per weight:
    # |delta_k| <= u32 sum_r m_r,k, then Hoeffding over k as for the operand term)
    acc = LAMBDA * (math.sqrt(max(K, 1)) * U32 * abs_sum)
    sq_sum = x_sq @ (w64 * w64)
    if dequant_magnitudes is None:
        m = 2 * w64.abs()
    else:
        m = sum(t.to(device=w64.device, dtype=torch.float64).abs() for t in dequant_magnitudes)
        assert tuple(m.shape) == tuple(w64.shape), f"dequant_magnitudes {tuple(m.shape)} != w {tuple(w64.shape)}"
    acc = acc + LAMBDA * U32 * (sq_sum.sqrt() + (x_sq @ (m * m)).sqrt())
    if bias is not None:  # one fp32 addition
        acc = acc + 2 * U32 * (abs_sum + bias.to(torch.float64).abs())
    rounding = _operand_rounding(operand_dtype)
    operand = _operand_term(rounding, sq_sum, (x64 * x64) @ (w64 != 0).to(torch.float64)) if rounding[0] else 0.0
    shape = x.shape[:-1] + (w64.shape[-1],)
    return Allowance(acc, operand).map(lambda t: t.reshape(shape))


def int4_dequant_magnitudes(weight, backend: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """For matmul_allowance(dequant_magnitudes=...): the (K, N) magnitudes (float64; an Int4Weight: in qweight's row
    order, a Sparse24Int4Weight: expanded to the dense K, 0 at pruned positions) that `backend`'s fp32 arithmetic
    rounds on the way from the stored q, s, o to each weight's share of the dot (all backends dequantize in fp32):
      reference, triton, cuda   w = q * s + o: the product and the sum, (|q s|, |w|)
      cpu, an Int4Weight (csrc/cpu/int4_mm_simd.h, the fused path)  s (q - 8) summed against x and scaled, plus
                                (o + 8 s) times the sum of x: (|s (q - 8)|, |o + 8 s|) (its dequantize + BLAS path
                                rounds q s + o once, relative to |w|, no more than their sum)
      cpu, a Sparse24Int4Weight (csrc/cpu/sparse24_int4_mm_simd.h)  w = q s + o per kept value, fused into one
                                rounding on the SIMD paths, two in plain C++ and its expand + BLAS path: the
                                reference's (|q s|, |w|)."""
    from .formats.int4 import unpack_int4
    f64 = torch.float64
    if hasattr(weight, "meta"):  # Sparse24Int4Weight: the kept values are an Int4Weight over K/2
        from .reference.sparse24_mm import sparse24_to_dense
        # its C++ kernel dequantizes each kept value as the reference does, not in the int4 kernel's centred form
        kept_backend = "reference" if backend == "cpu" else backend
        return tuple(sparse24_to_dense(m.t(), weight.meta, f64).t()
                     for m in int4_dequant_magnitudes(weight.int4, kept_backend))
    q = unpack_int4(weight.qweight, weight.in_features).to(f64)
    group = torch.arange(weight.in_features, device=q.device) // weight.effective_group_size
    s, o = weight.scales.to(f64)[group], weight.offsets.to(f64)[group]
    if backend == "cpu":
        return (s * (q - 8)).abs(), (o + 8 * s).abs()
    return (q * s).abs(), (q * s + o).abs()


def cancelling_bias(product_row: torch.Tensor, dtype: torch.dtype, remainder: float = 1e-2,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A bias (N,) in `dtype` that nearly cancels one row of a product (float64, (N,)): -round(row) plus a random
    remainder ~`remainder` times the row's size. Where it is added, golden = row + bias is much smaller than the row,
    so a kernel that rounds the product to `dtype` before adding the bias (two roundings) is off by up to half an
    ulp of the row: far outside rule (1) for that element, which allows one rounding of |golden|. A kernel that adds
    the bias to its fp32 sum before the one rounding passes."""
    row = product_row.to(torch.float64)
    noise = torch.randn(row.shape, dtype=torch.float64, generator=generator).to(row.device) \
        * remainder * row.abs().mean()
    return (noise - row.to(dtype).to(torch.float64)).to(dtype)


def operand_dtype(backend: str, dtype: torch.dtype, op: Optional[str] = None) -> Optional[torch.dtype]:
    """The dtype `backend` rounds the operands of its dots to, for inputs of `dtype`: the Triton and CUDA kernels
    feed fp16/bf16 operands to tensor cores (an int4 weight dequantized in fp32 is rounded to x's dtype, softmax
    probabilities to q's), except where the Triton UPCAST switch runs the dot in fp32 (fp32 inputs; bf16 under
    the interpreter). torch's CPU flash attention (the `torch` backend; aten/src/ATen/native/cpu/
    FlashAttentionKernel.cpp) stores the probabilities exp(s - running max) in q's dtype before its P @ V gemm,
    and in the backward P and dS before theirs: fp16/bf16 too. The reference and the CPU C++ kernels compute in
    fp32: None, except int4_mm's (op="int4_mm") with bf16 x on a CPU with AMX-BF16 and no TURBOKERNELS_CPU_ISA cap
    below it: from 12 rows it multiplies the weight dequantized and rounded to bf16 (AMX tiles or torch's bf16
    matmul, csrc/cpu/int4_mm.cpp run_amx_bf16, run_dequant_mm_bf16): bf16, for every M there (a looser bound than
    fewer rows need)."""
    if backend == "cpu" and op == "int4_mm" and dtype == torch.bfloat16 and _cpu_has_amx_bf16() \
            and os.environ.get("TURBOKERNELS_CPU_ISA", "") not in ("scalar", "avx2", "avx512"):
        return dtype
    if backend not in ("triton", "cuda", "torch") or dtype not in (torch.float16, torch.bfloat16):
        return None
    if backend == "triton":
        from turbokernels.kernels._launch import upcast_dots
        if upcast_dots(dtype):
            return None
    return dtype


# torch's CPU flash attention forward takes its probabilities exp(s - max) from at::vec's fast exponentials:
# Vectorized<float>::exp_u20 for fp32 inputs (a polynomial documented as 20 ulp: 40 U32 relative), fexp_u20 for
# fp16/bf16 inputs (a cubic fit of 2^f, f the fraction of s log2(e)). Its error is periodic in f, so a sweep of
# s - max over [-3, 0] in steps of 1e-4 sees every f: the largest relative error measured through the kernel's lse
# (torch 2.14, AMD EPYC, AVX-512) was 1.26e-4 for fp16 and 1.18e-4 for bf16; 2^-12 = 2.44e-4 holds it twice over.
# (On CPUs without AVX2 both fall back to the correctly rounded exp: the bound still holds.)
TORCH_EXP_ERROR = {torch.float32: 40 * U32, torch.float16: 2.0 ** -12, torch.bfloat16: 2.0 ** -12}


def exp_error(backend: str, dtype: torch.dtype) -> float:
    """The relative error of `backend`'s softmax exponential beyond a correctly rounded one, for inputs of
    `dtype` (the attention allowances' `exp_error`): TORCH_EXP_ERROR for the `torch` backend's forward; every
    other backend's exp is within the few ulps the allowances already hold (0)."""
    return TORCH_EXP_ERROR.get(dtype, 0.0) if backend == "torch" else 0.0


def _bound(golden64: torch.Tensor, dtype: torch.dtype, allowance: Allowance) -> torch.Tensor:
    a = torch.as_tensor(allowance.total, dtype=torch.float64, device=golden64.device)
    a = a.expand_as(golden64) if a.dim() else a
    return half_ulp(golden64.abs() + a, dtype) + a


def error_report(ours: torch.Tensor, golden: torch.Tensor, allowance: Optional[Allowance] = None):
    """(max error, max bound, max error / bound, elements out of bound) of ours against the rule (1)."""
    allowance = allowance or Allowance()
    golden64 = golden.to(torch.float64)
    err = (ours.to(torch.float64) - golden64).abs()
    bound = _bound(golden64, ours.dtype, allowance)
    ratio = err / bound
    return err.max().item(), bound.max().item(), ratio.max().item(), int((err > bound).sum().item())


# FlashAttention's check compares two maxima of rounding noise (ours and torch's, each a sum of roundings in a
# different order). Over a handful of elements a maximum is one or two draws, and a correct kernel exceeds 2x torch's
# lucky draw now and then: measured on one-element fp16 decode outputs (Triton, P rounded to fp16 as FlashAttention
# does), 1 of 300 random cases. Outputs smaller than this are judged by rule (1) alone.
MIN_ELEMENTS_2X = 32


def assert_close(ours: torch.Tensor, golden: torch.Tensor, baseline: Optional[torch.Tensor] = None, *,
                 allowance: Optional[Allowance] = None, factor: float = 2.0, what: str = "") -> None:
    """Rule (1) for every element of `ours` against the float64 `golden`, plus FlashAttention's check against
    `baseline` (torch's same-dtype result) for fp16/bf16 outputs of at least MIN_ELEMENTS_2X elements. Non-finite
    golden elements (an lse of -inf) must be matched exactly."""
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != expected {tuple(golden.shape)}"
    assert not torch.isnan(ours).any(), f"{what}: NaN in the output"
    if ours.numel() == 0:
        return
    allowance = allowance or Allowance()
    golden64 = golden.to(torch.float64)
    finite = torch.isfinite(golden64)
    if not finite.all():
        assert torch.equal(ours.to(torch.float64)[~finite], golden64[~finite]), \
            f"{what}: non-finite golden elements (-inf/inf) not reproduced"
        allowance = allowance.map(lambda t: t.expand_as(golden64)[finite] if t.dim() else t)
        ours, golden64 = ours[finite], golden64[finite]
        if ours.numel() == 0:
            return
    assert torch.isfinite(ours).all(), f"{what}: inf in the output where the golden result is finite"
    err = (ours.to(torch.float64) - golden64).abs()
    bound = _bound(golden64, ours.dtype, allowance)
    bad = err > bound
    if bad.any():
        i = int(torch.argmax(err / bound))
        flat_e, flat_b, flat_g = err.reshape(-1), bound.reshape(-1), golden64.reshape(-1)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements exceed the derived bound; worst: error "
            f"{flat_e[i].item():.3g} > bound {flat_b[i].item():.3g} at flat index {i} (golden {flat_g[i].item():.6g}, "
            f"ours {ours.reshape(-1)[i].item():.6g}); dtype {ours.dtype}")
    if baseline is None or ours.dtype not in (torch.float16, torch.bfloat16) or ours.numel() < MIN_ELEMENTS_2X:
        return
    base = baseline.to(torch.float64)[finite] if not finite.all() else baseline.to(torch.float64)
    base_err = (base - golden64).abs().max().item()
    if base_err == 0.0:
        return
    acc = torch.as_tensor(allowance.accumulation, dtype=torch.float64)
    slack = half_ulp(golden64.abs().max(), ours.dtype).item() + acc.max().item()
    worst = err.max().item()
    assert worst <= factor * base_err + slack, (
        f"{what}: max error {worst:.3g} exceeds {factor}x torch's same-dtype error ({base_err:.3g}) + one rounding "
        f"of the largest output and the fp32 accumulation allowance ({slack:.3g}); dtype {ours.dtype}")


# ---- allowances of attention ------------------------------------------------------------------------------------
def _softmax_pv_allowance(qh, kh, vh, s, allowed, bias, scale: float, softcap: float,
                          rounding: tuple[float, float], exp_error: float = 0.0) -> tuple[Allowance, Allowance]:
    """Forward attention in (B, H, T, D) / (B, H, S, D) layout, float64: (allowance of out (B, H, T, D), of the
    natural-log lse (B, H, T)). s: exact scores with -inf where not allowed.

    o_i = sum_j p_ij v_j: an error ds_j in score j moves o_i by sum_j p_ij ds_j (v_j - o_i), at most
    2 max_j ds_j (P|V|)_i; the fp32 score of a dot of length D: LAMBDA sqrt(D) u |q_i|.|k_j| * scale, plus the
    roundings of the scale multiply, softcap's tanh, the ALiBi bias and exp2 (a few u each, relative to their size).
    Then the fp32 sum of sum_j p_ij v_j and of l_i = sum_j p_ij (and the rescalings of the online softmax: one
    multiply per key block), and, when P is rounded for the tensor-core dot, the operand term. An exp with a
    relative error exp_error changes p_j (in the sum and in P V alike) as a score error of that size would."""
    d = qh.shape[-1]
    if s.shape[-1] == 0:  # no keys: the output is exactly 0 and the lse -inf
        zeros = qh.new_zeros(qh.shape)
        return Allowance(zeros, zeros), Allowance(qh.new_zeros(qh.shape[:-1]), 0.0)
    allowed = allowed.expand_as(s)
    n = allowed.sum(-1).clamp(min=1).to(torch.float64)                                  # keys per row
    qk_abs = (qh.abs() @ kh.abs().transpose(-1, -2)) * scale
    ds = LAMBDA * math.sqrt(max(d, 1)) * U32 * qk_abs + 4 * U32 * (s.abs() + softcap) + 8 * U32 + exp_error
    if bias is not None:
        ds = ds + 4 * U32 * bias.abs()
    ds = torch.where(allowed, ds, torch.zeros_like(ds)).amax(-1)                       # (B, H, T)
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    pv_abs = p @ vh.abs()
    pv_sq = (p * p) @ (vh * vh)
    acc = (2 * ds + 2 * (LAMBDA * n.sqrt() + 2) * U32)[..., None] * pv_abs
    operand = _operand_term(rounding, pv_sq, allowed.to(torch.float64) @ (vh * vh))
    lse_acc = ds + (LAMBDA * n.sqrt() + 8) * U32 + 4 * U32 * torch.where(finite, lse, torch.zeros_like(lse)).abs()
    return Allowance(acc, operand), Allowance(lse_acc, 0.0)


def attention_allowance(q, k, v, *, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                        alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None,
                        operand_dtype: Optional[torch.dtype] = None,
                        exp_error: float = 0.0) -> tuple[Allowance, Allowance]:
    """(allowance of out, in q's layout; of lse, in the lse layout) for turbokernels.attention with these
    arguments (those of reference.attention.attention). operand_dtype: the dtype P is rounded to before the P @ V
    dot (q.dtype for fp16/bf16 tensor-core kernels; None when the dot runs in fp32). exp_error: the relative
    error of the backend's exp beyond a correctly rounded one (testing.exp_error)."""
    from .reference import attention as ref
    f64 = torch.float64
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    rounding = _operand_rounding(operand_dtype)
    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)

    def one(qd, kd, vd, slopes):  # dense (B, S, H, D)
        s, allowed, bias, ke = ref.dense_scores(qd, kd, slopes, scale, causal, window_size[0], window_size[1],
                                                softcap, f64)
        ve = ref.expand_kv(vd, qd.shape[2])
        return _softmax_pv_allowance(qd.transpose(1, 2), ke.transpose(1, 2), ve.transpose(1, 2), s, allowed, bias,
                                     scale, softcap, rounding, exp_error)

    if cu_seqlens_q is None:
        out_a, lse_a = one(q64, k64, v64, alibi_slopes)
        return out_a.map(lambda t: t.transpose(1, 2)), lse_a
    acc, opd = torch.zeros(q.shape, dtype=f64), torch.zeros(q.shape, dtype=f64)
    lse_acc = torch.zeros(q.shape[1], q.shape[0], dtype=f64)
    for b, q0, q1, k0, k1 in ref.sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        if q1 == q0:
            continue
        out_a, lse_a = one(q64[None, q0:q1], k64[None, k0:k1], v64[None, k0:k1], ref.slopes_for(alibi_slopes, b))
        acc[q0:q1] = out_a.accumulation[0].transpose(0, 1).cpu()
        opd[q0:q1] = out_a.operand[0].transpose(0, 1).cpu()
        lse_acc[:, q0:q1] = lse_a.accumulation[0].cpu()
    dev = q.device
    return Allowance(acc.to(dev), opd.to(dev)), Allowance(lse_acc.to(dev), 0.0)


def decode_allowance(q, k_cache, v_cache, cache_seqlens, block_table=None, alibi_slopes=None, softmax_scale=None,
                     window_left=-1, window_right=-1, softcap=0.0,
                     operand_dtype: Optional[torch.dtype] = None, exp_error: float = 0.0, *,
                     cache_batch_idx=None, cache_leftpad=None, causal: bool = True, return_lse: bool = False):
    """Allowance of decode_attention's output (B, T, Hq, D), for the reference's arguments; with return_lse,
    (that, the allowance of its natural-log lse (B, Hq, T)). The split-KV combine (a weighted sum of partial
    outputs, weights from their lse; the lse from the max and the weighted sum) adds a few fp32 roundings: inside
    the constants. exp_error: as attention_allowance's."""
    from .reference.decode_attention import decode_scores
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qh, kh, vh, s, allowed, bias = decode_scores(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes,
                                                 scale, window_left, window_right, softcap, torch.float64,
                                                 cache_batch_idx, cache_leftpad, causal)
    out_a, lse_a = _softmax_pv_allowance(qh, kh, vh, s, allowed, bias, scale, softcap,
                                         _operand_rounding(operand_dtype), exp_error)
    # the combine: exp of lse differences and a normalisation, each relative to |o|
    lse = torch.logsumexp(s, -1, keepdim=True)
    out_a = out_a + Allowance(16 * U32 * ((torch.exp(s - lse.nan_to_num(0.0))
                                           .nan_to_num(0.0)) @ vh.abs()), 0.0)
    out_a = out_a.map(lambda t: t.transpose(1, 2))
    if not return_lse:
        return out_a
    # the combine's lse: M + log2 of a sum of split sums, times ln 2 (the base-2 max and log: relative to |lse|)
    lse = lse.squeeze(-1)
    lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return out_a, lse_a + Allowance(16 * U32 * (1.0 + lse.abs()), 0.0)


def attention_bwd_allowance(q, k, v, dout, out, lse, *, causal=False, softmax_scale=None, window_size=(-1, -1),
                            softcap=0.0, alibi_slopes=None, cu_seqlens_q=None, cu_seqlens_k=None,
                            operand_dtype: Optional[torch.dtype] = None,
                            output_partials=None) -> tuple[Allowance, Allowance, Allowance]:
    """Allowances of (dq, dk, dv) for the FlashAttention-2 backward fed with `out` and `lse` (what the kernel
    gets: their own errors against the exact forward are measured here and propagated). operand_dtype: the dtype P
    and dS are rounded to before their dots (q.dtype on tensor cores; None for fp32 dots). output_partials: for a
    kernel that accumulates the gradients in their own (input) dtype, f(sq, sk, hq, hkv) -> (n_dq, n_dkv), how
    many partial sums of each dq and each dk/dv element are rounded to it (testing.bwd_output_partials); each
    rounding but the last (the output's own, in rule (1)) adds u |partial| <= u sum |terms|, independent:
    LAMBDA sqrt(n - 1) u sum |terms|.

        dV = P^T dO      dP = dO V^T      D = rowsum(dO * O)      dS = P (dP - D) [(1 - t^2) with softcap]
        dQ = scale dS K   dK = scale dS^T Q      (GQA: dK, dV summed over the q heads of a kv head)
    Errors: P = exp(s - lse) carries the score error ds and lse's error; dP a D-long fp32 dot; D the error of the
    O it is given; dS these three; each matmul then adds its fp32 sum and the rounding of its P / dS operand."""
    from .reference import attention as ref
    f64 = torch.float64
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    rounding = _operand_rounding(operand_dtype)
    t64 = [t.to(f64) for t in (q, k, v, dout, out)]
    lse64 = lse.to(f64)

    def one(qd, kd, vd, dod, od, lse_used, slopes):  # dense (1 or B, S, H, D); lse_used (B, H, Sq)
        B, sq, hq, d = qd.shape
        sk, hkv = kd.shape[1], kd.shape[2]
        g = hq // hkv
        if 0 in (B, sq, sk):  # no keys (dq exactly 0), no queries (dk, dv exactly 0) or nothing at all
            return [Allowance(torch.zeros_like(t), torch.zeros_like(t)) for t in (qd, kd, vd)]
        s, allowed, bias, ke = ref.dense_scores(qd, kd, slopes, scale, causal, window_size[0], window_size[1],
                                                softcap, f64)
        ve = ref.expand_kv(vd, hq)
        qh, kh, vh, doh, oh = (t.transpose(1, 2) for t in (qd, ke, ve, dod, od))     # (B, H, S, D)
        allowed = allowed.expand_as(s)
        lse_exact = torch.logsumexp(s, dim=-1)
        finite = torch.isfinite(lse_exact)
        p = torch.exp(s - torch.where(finite, lse_exact, torch.zeros_like(lse_exact))[..., None])
        o_exact = p @ vh
        qk_abs = (qh.abs() @ kh.abs().transpose(-1, -2)) * scale
        ds_ = LAMBDA * math.sqrt(d) * U32 * qk_abs + 4 * U32 * (s.abs() + softcap) + 8 * U32
        if bias is not None:
            ds_ = ds_ + 4 * U32 * bias.abs()
        ds_row = torch.where(allowed, ds_, torch.zeros_like(ds_)).amax(-1)             # (B, H, Sq)
        lse_err = torch.where(finite, (lse_used - lse_exact).abs(), torch.zeros_like(lse_exact))
        rel_p = ds_row + lse_err + 4 * U32 * torch.where(finite, lse_exact, torch.zeros_like(lse_exact)).abs()
        # dV
        dv_acc = (p * rel_p[..., None]).transpose(-1, -2) @ doh.abs() \
            + LAMBDA * math.sqrt(sq * g) * U32 * (p.transpose(-1, -2) @ doh.abs())
        ok = allowed.to(f64)
        dv_sq = (p * p).transpose(-1, -2) @ (doh * doh)
        dv_floor = ok.transpose(-1, -2) @ (doh * doh)
        # dS
        dp = doh @ vh.transpose(-1, -2)
        dp_err = LAMBDA * math.sqrt(d) * U32 * (doh.abs() @ vh.abs().transpose(-1, -2))
        delta = (doh * o_exact).sum(-1)
        delta_err = (doh.abs() * (oh - o_exact).abs()).sum(-1) + LAMBDA * math.sqrt(d) * U32 * (doh.abs() * oh.abs()).sum(-1)
        c = torch.ones_like(s)
        if softcap > 0:
            t = torch.tanh((qh @ kh.transpose(-1, -2)) * scale / softcap)
            c = 1 - t * t
        dpd = (dp - delta[..., None]).abs()
        dS = p * (dp - delta[..., None]) * c
        dS_err = (p * rel_p[..., None] * dpd + p * (dp_err + delta_err[..., None])) * c + 4 * U32 * dS.abs()
        if softcap > 0:
            dS_err = dS_err + 10 * U32 * p * dpd
        dS_err = torch.where(allowed, dS_err, torch.zeros_like(dS_err))
        # fp32 underflow: below fp32's smallest normal number the relative errors above become absolute ones,
        # at most ETA32 (half the spacing of fp32's subnormals) per rounding. Probabilities that small (keys far
        # below a row's maximum) give P an absolute error of up to 4 ETA32 (exp: a few roundings), dS = P (dP - D)
        # that times |dP - D| plus 2 ETA32 (the product; softcap's factor), and every sum of n such terms n + 2
        # more (its additions, the scale multiply, the result): the gradients of keys whose probabilities all
        # underflow (~1e-44) are that inexact on every backend, the reference included.
        n_keys, n_rows = ok.sum(-1)[..., None], ok.sum(-2)[..., None]        # allowed keys per row, rows per key
        dS_under = (4 * dpd + 2) * ETA32 * ok
        dv_acc = dv_acc + 4 * ETA32 * (ok.transpose(-1, -2) @ doh.abs()) + ETA32 * (n_rows + 2)
        dq_acc = scale * (dS_err @ kh.abs() + LAMBDA * math.sqrt(sk) * U32 * (dS.abs() @ kh.abs())) \
            + 2 * U32 * scale * (dS @ kh).abs() + scale * (dS_under @ kh.abs()) + ETA32 * (n_keys + 2)
        dq_sq = scale ** 2 * ((dS * dS) @ (kh * kh))
        dq_floor = scale ** 2 * (ok @ (kh * kh))
        dk_acc = scale * (dS_err.transpose(-1, -2) @ qh.abs()
                          + LAMBDA * math.sqrt(sq * g) * U32 * (dS.abs().transpose(-1, -2) @ qh.abs())) \
            + 2 * U32 * scale * (dS.transpose(-1, -2) @ qh).abs() \
            + scale * (dS_under.transpose(-1, -2) @ qh.abs()) + ETA32 * (n_rows + 2)
        dk_sq = scale ** 2 * ((dS * dS).transpose(-1, -2) @ (qh * qh))
        dk_floor = scale ** 2 * (ok.transpose(-1, -2) @ (qh * qh))

        if output_partials is not None:
            n_dq, n_dkv = output_partials(sq, sk, hq, hkv)
            u_out = unit_roundoff(q.dtype)
            dq_acc = dq_acc + LAMBDA * math.sqrt(n_dq - 1) * u_out * scale * (dS.abs() @ kh.abs())
            dk_acc = dk_acc + LAMBDA * math.sqrt(n_dkv - 1) * u_out * scale * (dS.abs().transpose(-1, -2) @ qh.abs())
            dv_acc = dv_acc + LAMBDA * math.sqrt(n_dkv - 1) * u_out * (p.transpose(-1, -2) @ doh.abs())

        def group_sum(t):  # (B, Hq, S, D) -> (B, Hkv, S, D): the q heads of one kv head add up
            return t.reshape(B, hkv, g, *t.shape[2:]).sum(2)

        out = []
        for acc_, sq_, floor, grouped in ((dq_acc, dq_sq, dq_floor, False), (dk_acc, dk_sq, dk_floor, True),
                                          (dv_acc, dv_sq, dv_floor, True)):
            if grouped:
                acc_, sq_, floor = group_sum(acc_), group_sum(sq_), group_sum(floor)
            opd = _operand_term(rounding, sq_, floor)
            out.append(Allowance(acc_.transpose(1, 2), opd.transpose(1, 2)))
        return out

    if cu_seqlens_q is None:
        return tuple(one(*t64, lse64, alibi_slopes))
    parts = [[torch.zeros(t.shape, dtype=f64), torch.zeros(t.shape, dtype=f64)] for t in (q, k, v)]
    for b, q0, q1, k0, k1 in ref.sequences(q, k, cu_seqlens_q, cu_seqlens_k):
        if q1 == q0 or k1 == k0:
            continue
        qd, kd, vd, dod, od = (t[None, a:z] for t, (a, z) in zip(t64, [(q0, q1), (k0, k1), (k0, k1), (q0, q1),
                                                                           (q0, q1)]))
        res = one(qd, kd, vd, dod, od, lse64[None, :, q0:q1], ref.slopes_for(alibi_slopes, b))
        for n, (a, z) in enumerate([(q0, q1), (k0, k1), (k0, k1)]):
            parts[n][0][a:z] = res[n].accumulation[0].cpu()
            parts[n][1][a:z] = res[n].operand[0].cpu()
    dev = q.device
    return tuple(Allowance(a.to(dev), o.to(dev)) for a, o in parts)


def _torch_bwd_partials(sq: int, sk: int, hq: int, hkv: int) -> tuple[int, int]:
    """torch's CPU flash backward (FlashAttentionKernel.cpp, cpu_flash_attention_backward) adds each block's
    product into grad_q/grad_k/grad_v in the inputs' dtype (gemm with beta = 1): dq once per key block of 512,
    dk/dv once per query block (256 rows from 768 query rows on, 64 from 192, else 32) and q head of its group."""
    q_split = 256 if sq >= 768 else 64 if sq >= 192 else 32
    return max(1, math.ceil(sk / 512)), max(1, math.ceil(sq / q_split) * (hq // hkv))


def bwd_output_partials(backend: str):
    """attention_bwd_allowance's output_partials for `backend` (None: accumulates in fp32, rounds once)."""
    return _torch_bwd_partials if backend == "torch" else None


# ---- static code generation --------------------------------------------------------------------------------------
def _triton_bin(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not shipped with this triton ({path})")
    return path


@dataclasses.dataclass
class CodegenReport:
    capability: int
    ptx: str
    sass: str
    registers: int
    spill_bytes: int          # spill stores + spill loads reported by ptxas
    shared_bytes: int         # static + dynamic shared memory the launch needs
    ptxas_log: str
    ttir: str = ""            # Triton IR after its target-independent passes (int32_stride_products reads it)

    def count(self, pattern: str, in_sass: bool = False) -> int:
        return len(re.findall(pattern, self.sass if in_sass else self.ptx))

    @property
    def uses_wgmma(self) -> bool:
        return "wgmma.mma_async" in self.ptx

    @property
    def uses_mma(self) -> bool:
        return re.search(r"\bmma\.sync\.aligned", self.ptx) is not None


@dataclasses.dataclass(frozen=True)
class CodegenJob:
    kernel: str                 # "module:function" of a @triton.jit kernel, e.g. "turbokernels.kernels.int4_mm:int4_mm_kernel"
    signature: tuple            # ((arg, type), ...) for the runtime arguments, e.g. ("x_ptr", "*fp16")
    constexprs: tuple           # ((arg, value), ...)
    capability: int             # 80, 86, 89, 90 ...
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple = ()  # arguments the launcher's JIT would see as multiples of 16
    options: tuple = ()         # ((option, value), ...) the launcher passes too, e.g. (("enable_fp_fusion", False),)


def _compile_one(job: CodegenJob) -> CodegenReport:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module, name = job.kernel.split(":")
    fn = getattr(importlib.import_module(module), name)
    constexprs = dict(job.constexprs)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in job.divisible_by_16}
    src = ASTSource(fn=fn, signature={**dict(job.signature), **{k: "constexpr" for k in constexprs}},
                    constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", job.capability, 32)
    options = make_backend(target).parse_options({"num_warps": job.num_warps, "num_stages": job.num_stages,
                                                  **dict(job.options)}).__dict__
    kernel = triton.compile(src, target=target, options=options)
    ptx = kernel.asm["ptx"]
    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin_path = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx_path, "w") as f:
            f.write(ptx)
        log = subprocess.run([_triton_bin("ptxas"), "-v", f"--gpu-name={arch}", ptx_path, "-o", cubin_path],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([_triton_bin("cuobjdump"), "--dump-sass", cubin_path],
                              capture_output=True, text=True, check=True).stdout
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return CodegenReport(capability=job.capability, ptx=ptx, sass=sass, registers=registers, spill_bytes=spills,
                         shared_bytes=int(kernel.metadata.shared), ptxas_log=log, ttir=kernel.asm["ttir"])


def compile_triton(jobs: list[CodegenJob]) -> list[CodegenReport]:
    """Compile kernels for their targets without a GPU. Under TRITON_INTERPRET=1 this process's @triton.jit
    functions are interpreter objects, so the compilation runs in child processes without it: one per CPU this
    process may use (compilation is most of the codegen tests' time), each taking every n-th job."""
    from .backends import triton_interpreting
    if not triton_interpreting():
        return [_compile_one(job) for job in jobs]
    import pickle
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    workers = max(1, min(len(jobs), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                         else (os.cpu_count() or 1)))
    code = ("import pickle, sys; from turbokernels.testing import _compile_one; "
            "jobs = pickle.load(open(sys.argv[1], 'rb')); "
            "pickle.dump([_compile_one(j) for j in jobs], open(sys.argv[2], 'wb'))")
    with tempfile.TemporaryDirectory() as tmp:
        children = []
        for w in range(workers):
            path_in, path_out = os.path.join(tmp, f"jobs{w}.pkl"), os.path.join(tmp, f"reports{w}.pkl")
            with open(path_in, "wb") as f:
                pickle.dump(jobs[w::workers], f)
            children.append((subprocess.Popen([sys.executable, "-c", code, path_in, path_out], env=env), path_out))
        failed = [child.args for child, _ in children if child.wait() != 0]
        if failed:
            raise subprocess.CalledProcessError(1, failed[0])
        reports: list = [None] * len(jobs)
        for w, (_, path_out) in enumerate(children):
            with open(path_out, "rb") as f:
                reports[w::workers] = pickle.load(f)
        return reports


# ---- 32-bit products of strides (static) ---------------------------------------------------------------------------
# Ops through which a value keeps what it is: a stride stays a stride, a bounded tile index stays bounded.
_SHAPE_OPS = ("tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans")
# Integer ops whose result is bounded at compile time when every operand is.
_BOUNDED_OPS = _SHAPE_OPS + ("arith.addi", "arith.subi", "arith.muli", "arith.divsi", "arith.divui", "arith.remsi",
                             "arith.remui", "arith.andi", "arith.ori", "arith.minsi", "arith.maxsi", "arith.extsi",
                             "arith.trunci")
_TTIR_OP = re.compile(r"^\s*(?:(%[\w$.-]+)(?::\d+)? = )?\"?([a-z_]+\.[\w.]+)\"?(.*)$")
_TTIR_VALUE = re.compile(r"%[\w$.-]+(?:#\d+)?")


def int32_stride_products(ttir: str, arg_names: list[str]) -> list[str]:
    """The 32-bit products of stride arguments that can pass 2^31 in a kernel's Triton IR (TTIR): [] when every
    int32 argument named stride_* is sign-extended to i64 (arith.extsi) before it scales a position, except where
    it multiplies a tile index bounded at compile time -- a value computed from tt.make_range and constants only,
    so that the product is below BLOCK * stride (the launchers keep that below 2^31: kernels/_launch.py
    int32_tile_offsets). Any other use of a stride than those, a shape op (splat, broadcast...) or tt.addptr is
    reported as well, so that a new pattern gets looked at rather than passed. arg_names: the kernel's runtime
    arguments in order (TTIR names them %argN in some Triton versions)."""
    lines = ttir.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("tt.func public"))
    names = re.findall(r"%([\w$.-]+): ", header)
    if all(re.fullmatch(r"arg\d+", n) for n in names):
        assert len(names) == len(arg_names), f"{len(names)} TTIR arguments, {len(arg_names)} names given"
        names = [f"%{n}" for n in names]
        strides = {v: a for v, a in zip(names, arg_names) if a.startswith("stride_")}
    else:
        strides = {f"%{n}": n for n in names if n.startswith("stride_")}
    types = dict(re.findall(r"(%[\w$.-]+): ([^ ,{)]+)", header))
    # MLIR reuses value names in sibling regions (two loops may both define %kt_81): one scope per region
    scopes = [({v: a for v, a in strides.items() if types.get(v) == "i32"}, set())]  # i64: the JIT saw >= 2^31

    def stride(value):
        return next((s[value] for s, _ in reversed(scopes) if value in s), None)

    def is_bounded(value):
        return any(value in b for _, b in scopes)

    found = []
    for line in lines[lines.index(header) + 1:]:
        if line.lstrip().startswith("}"):
            scopes.pop()
            if not scopes:
                break
        m = _TTIR_OP.match(line)
        if m:
            result, op, rest = m.groups()
            operands = _TTIR_VALUE.findall(rest.split(" loc(")[0].split(" : ")[0] if op != "scf.for" else rest)
            strides_here, bounded_here = scopes[-1]
            if op in ("tt.make_range", "arith.constant"):
                bounded_here.add(result)
            elif result and op in _BOUNDED_OPS and operands and all(is_bounded(o) for o in operands):
                bounded_here.add(result)
            used = [o for o in operands if stride(o)]
            if used:
                what = ", ".join(sorted({stride(o) for o in used}))
                others = [o for o in operands if o not in used] or operands[1:]
                if op in _SHAPE_OPS:
                    strides_here[result] = what
                elif op in ("arith.extsi", "tt.addptr"):
                    pass  # widened to 64 bits; or a pointer plus one stride (< 2^31 elements)
                elif op != "arith.muli":
                    found.append(f"{what} used by {op}, which this check does not follow: {line.strip()[:160]}")
                elif not all(is_bounded(o) for o in others):
                    found.append(f"{what} scales a 32-bit value not bounded at compile time: {line.strip()[:160]}")
        if line.rstrip().endswith("{"):
            scopes.append(({}, set()))
    return found


def cuda_available() -> bool:
    return torch.cuda.is_available()


def skip_reason_no_ptxas() -> Optional[str]:
    try:
        _triton_bin("ptxas")
        _triton_bin("cuobjdump")
    except (ImportError, FileNotFoundError) as exc:
        return str(exc)
    return None

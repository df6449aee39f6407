"""Triton attention backward (kernels/attention_bwd.py), and the `torch` backend's (torch's CPU flash backward) on
CPU tensors, against the autograd of a float64 masked-softmax attention.

The reference lives here (not in turbokernels.reference) so this file tests the kernel on its own: a float64
forward gives `out` and `lse` to feed the backward, its autograd gives the golden (dq, dk, dv), and the same code
run in the input dtype is the baseline of the tolerance rule (testing.assert_close).
"""
import itertools

import pytest
import torch

import turbokernels as tk
from conftest import interpreting
from turbokernels.testing import (CodegenJob, assert_close, attention_bwd_allowance, bwd_output_partials,
                                  compile_triton, operand_dtype, skip_reason_no_ptxas)

TRITON = interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="triton needs CUDA or TRITON_INTERPRET=1")


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# the `torch` backend (torch's CPU kernels) is held to the backward tests on CPU tensors
BACKENDS = (["triton"] if TRITON else []) + (["torch"] if device() == "cpu" else [])


# ---- reference ---------------------------------------------------------------------------------------------------
def allowed_keys(sq, sk, causal, window, dev):
    """(sq, sk) bool: FlashAttention's bottom-right aligned causal/window mask."""
    i = torch.arange(sq, device=dev)[:, None]
    j = torch.arange(sk, device=dev)[None, :]
    diag = i + sk - sq
    ok = torch.ones(sq, sk, dtype=torch.bool, device=dev)
    left, right = window
    if causal:
        right = 0
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


def reference(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None):
    """Dense (batch, seqlen, heads, dim) attention in q's dtype -> (out, lse fp32 (batch, heads, sq))."""
    b, sq, hq, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    if alibi is not None:
        slopes = alibi.to(s.dtype).expand(b, hq) if alibi.dim() == 1 else alibi.to(s.dtype)
        s = s - slopes[:, :, None, None] * (i + sk - sq - j).abs().to(s.dtype)
    ok = allowed_keys(sq, sk, causal, window, q.device)
    s = s.masked_fill(~ok, float("-inf"))
    with torch.no_grad():
        lse = torch.logsumexp(s.double(), dim=-1).float()
    # Rows with no allowed key: softmax over zeros, then multiplied by 0, so they give 0 and no NaN gradient.
    row_ok = ok.any(dim=-1)[:, None]
    p = torch.softmax(torch.where(row_ok, s, torch.zeros_like(s)), dim=-1) * row_ok
    out = torch.einsum("bhij,bjhd->bihd", p, v)
    return out, lse


def golden_and_baseline(q, k, v, dout, **kw):
    """(out in q's dtype, lse fp32, golden float64 grads, baseline grads in q's dtype)."""
    grads = []
    out_lse = None
    for dt in (torch.float64, q.dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = reference(*leaves, **kw)
        out.backward(dout.to(dt))
        grads.append([t.grad for t in leaves])
        if dt == torch.float64:
            out_lse = (out.detach().to(q.dtype), lse)
    return out_lse[0], out_lse[1], grads[0], grads[1]


def launch(dout, q, k, v, out, lse, *, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
           deterministic=False, cu_q=None, cu_k=None, config=None, backend="triton"):
    if backend != "triton":
        with tk.backend(backend):
            return torch.ops.turbokernels.attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, alibi, scale, causal,
                                                        window[0], window[1], softcap, deterministic)
    from turbokernels.kernels.attention_bwd import attention_bwd
    return attention_bwd(dout, q, k, v, out, lse, cu_q, cu_k, alibi, scale, causal, window[0], window[1],
                         softcap, deterministic, config=config)


def make(b, sq, sk, hq, hkv, d, dtype):
    dev = device()
    q = torch.randn(b, sq, hq, d, device=dev).to(dtype)
    k = torch.randn(b, sk, hkv, d, device=dev).to(dtype)
    v = torch.randn(b, sk, hkv, d, device=dev).to(dtype)
    dout = torch.randn(b, sq, hq, d, device=dev).to(dtype)
    return q, k, v, dout


def allowances(q, k, v, dout, out, lse, *, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
               cu_q=None, cu_k=None, backend="triton"):
    """The derived allowances of (dq, dk, dv) for the kernel fed with this out and lse (P and dS rounded to q's
    dtype for the tensor-core dots, except under UPCAST; in torch's CPU kernel too, which also adds its partial
    gradients in the inputs' dtype). torch's backward takes P = exp(s - lse) from the correctly rounded vectorized
    exp: no exp_error here."""
    return attention_bwd_allowance(q, k, v, dout, out, lse, causal=causal, softmax_scale=scale, window_size=window,
                                   softcap=softcap, alibi_slopes=alibi, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                   operand_dtype=operand_dtype(backend, q.dtype),
                                   output_partials=bwd_output_partials(backend))


def check(grads, golden, baseline, allowance, what):
    for name, ours, gold, base, a in zip(("dq", "dk", "dv"), grads, golden, baseline, allowance):
        assert_close(ours, gold, base, allowance=a, what=f"{what} {name}")


# ---- correctness -------------------------------------------------------------------------------------------------
# (batch, sq, sk, heads_q, heads_kv, head_dim, dtype, options)
CASES = [
    (1, 1, 1, 2, 2, 64, torch.float16, {}),
    (2, 17, 17, 2, 1, 40, torch.float16, {"causal": True}),
    (1, 97, 113, 4, 2, 64, torch.float16, {}),
    (1, 113, 97, 4, 2, 64, torch.bfloat16, {"causal": True}),
    (1, 97, 113, 4, 1, 96, torch.bfloat16, {"causal": True, "deterministic": True}),
    (1, 128, 128, 2, 2, 128, torch.float16, {"causal": True, "deterministic": True}),
    (1, 65, 80, 2, 2, 128, torch.bfloat16, {"window": (16, 8)}),
    (2, 33, 70, 4, 2, 64, torch.float16, {"window": (20, -1), "deterministic": True}),
    (1, 70, 33, 2, 1, 64, torch.float16, {"window": (-1, 5)}),
    # window (33, 1) with 128-row/key blocks: the band starts or ends one key/row past a block edge
    (1, 160, 160, 2, 1, 64, torch.float16, {"window": (33, 1), "deterministic": True}),
    (1, 64, 96, 4, 4, 64, torch.float16, {"softcap": 0.8, "causal": True}),
    (1, 50, 50, 2, 2, 40, torch.bfloat16, {"softcap": 2.0, "deterministic": True}),
    (1, 60, 90, 4, 2, 64, torch.float16, {"alibi": "heads", "causal": True}),
    (2, 47, 47, 2, 1, 64, torch.bfloat16, {"alibi": "batch", "window": (10, 10), "deterministic": True}),
    (1, 45, 77, 2, 1, 40, torch.float32, {"causal": True}),
    (1, 45, 77, 4, 2, 64, torch.float32, {"softcap": 1.5, "alibi": "heads", "deterministic": True}),
    (1, 17, 17, 2, 1, 256, torch.float16, {"causal": True}),
]


def case_id(c):
    b, sq, sk, hq, hkv, d, dt, opts = c
    extra = "-".join(f"{k}{'' if v is True else v}" for k, v in opts.items()).replace(" ", "")
    return f"b{b}-{sq}x{sk}-h{hq}/{hkv}-d{d}-{str(dt)[6:]}" + (f"-{extra}" if extra else "")


def options(opts, b, hq, d):
    kw = {k: v for k, v in opts.items() if k not in ("alibi", "deterministic")}
    kw["scale"] = d ** -0.5
    if "alibi" in opts:
        shape = (hq,) if opts["alibi"] == "heads" else (b, hq)
        kw["alibi"] = torch.rand(shape, device=device()) * 0.5
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,sq,sk,hq,hkv,d,dtype,opts", CASES, ids=[case_id(c) for c in CASES])
def test_matches_golden(b, sq, sk, hq, hkv, d, dtype, opts, backend):
    q, k, v, dout = make(b, sq, sk, hq, hkv, d, dtype)
    kw = options(opts, b, hq, d)
    out, lse, golden, baseline = golden_and_baseline(q, k, v, dout, **kw)
    if backend == "torch" and kw.get("softcap", 0.0) > 0:  # no additive mask expresses tanh: declined
        with pytest.raises(tk.BackendUnavailable, match="softcap"):
            launch(dout, q, k, v, out, lse, backend=backend, **kw)
        return
    dq, dk, dv = launch(dout, q, k, v, out, lse, deterministic=opts.get("deterministic", False), backend=backend,
                        **kw)
    for ours, ref in zip((dq, dk, dv), (q, k, v)):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
    check((dq, dk, dv), golden, baseline, allowances(q, k, v, dout, out, lse, backend=backend, **kw),
          f"{backend} {case_id((b, sq, sk, hq, hkv, d, dtype, opts))}")


@pytest.mark.parametrize("backend,deterministic", [(b, d) for b in BACKENDS for d in (False, True)
                                                   if b == "triton" or d],
                         ids=lambda x: x if isinstance(x, str) else ("deterministic" if x else "atomic"))
def test_varlen_matches_per_sequence(backend, deterministic):
    """Packed sequences (no queries, no keys, odd lengths, q longer and shorter than k) against the reference run
    on each sequence alone, with GQA, causal and ALiBi per (batch, head)."""
    lens_q, lens_k = [17, 0, 40, 5, 6], [30, 9, 23, 5, 0]
    hq, hkv, d, dtype = 4, 2, 40, torch.float16
    dev = device()
    cu_q = torch.tensor([0] + lens_q, device=dev).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k, device=dev).cumsum(0).to(torch.int32)
    q = torch.randn(sum(lens_q), hq, d, device=dev).to(dtype)
    k = torch.randn(sum(lens_k), hkv, d, device=dev).to(dtype)
    v = torch.randn(sum(lens_k), hkv, d, device=dev).to(dtype)
    dout = torch.randn(sum(lens_q), hq, d, device=dev).to(dtype)
    alibi = torch.rand(len(lens_q), hq, device=dev) * 0.5
    out = torch.empty_like(q)
    lse = torch.empty(hq, sum(lens_q), device=dev)
    golden, baseline = [], []
    for i in range(len(lens_q)):
        sl_q, sl_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        o, l, g, bl = golden_and_baseline(q[None, sl_q], k[None, sl_k], v[None, sl_k], dout[None, sl_q],
                                          scale=0.15, causal=True, alibi=alibi[i])
        out[sl_q], lse[:, sl_q] = o[0], l[0]
        golden.append([t[0] for t in g])
        baseline.append([t[0] for t in bl])
    dq, dk, dv = launch(dout, q, k, v, out, lse, scale=0.15, causal=True, alibi=alibi, cu_q=cu_q, cu_k=cu_k,
                        deterministic=deterministic, backend=backend)
    allowance = allowances(q, k, v, dout, out, lse, scale=0.15, causal=True, alibi=alibi, cu_q=cu_q, cu_k=cu_k,
                           backend=backend)
    for n, ours in enumerate((dq, dk, dv)):
        assert_close(ours, torch.cat([g[n] for g in golden]), torch.cat([g[n] for g in baseline]),
                     allowance=allowance[n], what=("dq", "dk", "dv")[n])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_have_zero_gradients(backend):
    """Causal with seqlen_q > seqlen_k: the first sq - sk query rows see no key (lse = -inf, out = 0)."""
    b, sq, sk, hq, hkv, d = 1, 40, 9, 2, 1, 64
    q, k, v, dout = make(b, sq, sk, hq, hkv, d, torch.float16)
    out, lse, golden, baseline = golden_and_baseline(q, k, v, dout, scale=0.125, causal=True)
    assert torch.isinf(lse[:, :, : sq - sk]).all()
    for deterministic in (False, True):
        dq, dk, dv = launch(dout, q, k, v, out, lse, scale=0.125, causal=True, deterministic=deterministic,
                            backend=backend)
        assert not any(torch.isnan(t).any() for t in (dq, dk, dv))
        assert (dq[:, : sq - sk] == 0).all()
        check((dq, dk, dv), golden, baseline,
              allowances(q, k, v, dout, out, lse, scale=0.125, causal=True, backend=backend),
              f"{backend} deterministic={deterministic}")


@pytest.mark.parametrize("shape", [(1, 3, 0, 2, 1), (0, 3, 5, 2, 1), (1, 0, 5, 2, 2)], ids=["no_keys", "batch0", "no_rows"])
def test_allowance_of_empty_attention_is_zero(shape):
    """attention_bwd_allowance without keys (dq exactly 0), rows or batch: zero allowances of the gradients' shapes
    (it used to raise: an amax over the empty key dim)."""
    b, sq, sk, hq, hkv = shape
    q, k, v, dout = make(b, sq, sk, hq, hkv, 8, torch.float32)
    out = torch.zeros_like(q)
    lse = torch.full((b, hq, sq), float("-inf"))
    for a, t in zip(attention_bwd_allowance(q, k, v, dout, out, lse), (q, k, v)):
        for part in (a.accumulation, a.operand):
            assert part.shape == t.shape and not part.any()


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_underflowing_probabilities(deterministic):
    """Found by tests/test_fuzz.py: scores spread over hundreds (inputs of size 3, d = 96, scale 0.5) leave some keys
    only probabilities below fp32's smallest normal number, and their dk (~1e-44) a few subnormal spacings off on
    every backend; attention_bwd_allowance counts fp32's absolute rounding floor there (testing.ETA32)."""
    g = torch.Generator().manual_seed(18)
    q, k, v = (torch.randn(1, n, 1, 96, generator=g) * 3 for n in (5, 7, 7))
    dout = torch.randn(1, 5, 1, 96, generator=g)
    q, k, v, dout = (t.to(device()) for t in (q, k, v, dout))
    out, lse, golden, baseline = golden_and_baseline(q, k, v, dout, scale=0.5)
    dq, dk, dv = launch(dout, q, k, v, out, lse, scale=0.5, deterministic=deterministic)
    tiny = golden[1].abs() < torch.finfo(torch.float32).tiny
    assert (tiny & (golden[1] != 0)).any()  # the case: subnormal gradients
    check((dq, dk, dv), golden, baseline, allowances(q, k, v, dout, out, lse, scale=0.5), "underflow")


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_is_bitwise_repeatable(backend):
    q, k, v, dout = make(1, 70, 90, 4, 1, 64, torch.float16)
    out, lse, _, _ = golden_and_baseline(q, k, v, dout, scale=0.125, causal=True)
    first = launch(dout, q, k, v, out, lse, scale=0.125, causal=True, deterministic=True, backend=backend)
    second = launch(dout, q, k, v, out, lse, scale=0.125, causal=True, deterministic=True, backend=backend)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@needs_triton
def test_strided_inputs():
    """q/k/v as views of one packed (b, s, 3, h, d) projection, dout transposed: no copies needed."""
    b, s, h, d = 1, 37, 2, 64
    qkv = torch.randn(b, s, 3, h, d, device=device()).half()
    q, k, v = qkv.unbind(2)
    dout = torch.randn(b, h, s, d, device=device()).half().transpose(1, 2)
    out, lse, golden, baseline = golden_and_baseline(q, k, v, dout, scale=0.125, causal=True)
    dq, dk, dv = launch(dout, q, k, v, out, lse, scale=0.125, causal=True)
    check((dq, dk, dv), golden, baseline, allowances(q, k, v, dout, out, lse, scale=0.125, causal=True), "strided")


def shipped_configs():
    from turbokernels.kernels.attention_bwd import CONFIGS
    seen = []
    for arch in CONFIGS.values():
        for table in arch.values():
            seen += [c for c in table if c not in seen]
    return seen


@needs_triton
def test_every_config_is_correct(monkeypatch):
    """Every shipped config (all architectures and head-dim buckets) on one awkward shape that spans several
    blocks, in both dQ modes, with NaN-poisoned outputs so an element the kernels forget to write fails."""
    import turbokernels.kernels.attention_bwd as kernel_module
    monkeypatch.setattr(kernel_module, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    q, k, v, dout = make(1, 70, 150, 2, 1, 40, torch.float16)
    out, lse, golden, baseline = golden_and_baseline(q, k, v, dout, scale=0.15, causal=True)
    allowance = allowances(q, k, v, dout, out, lse, scale=0.15, causal=True)
    for cfg in shipped_configs():
        for deterministic in (False, True):
            dq, dk, dv = launch(dout, q, k, v, out, lse, scale=0.15, causal=True, deterministic=deterministic,
                                config=cfg)
            check((dq, dk, dv), golden, baseline, allowance, f"{cfg} deterministic={deterministic}")


@needs_triton
def test_mask_edges():
    """The causal and window edges swept across the block boundaries the backward's loops use (the dK/dV kernel's
    query blocks, BLOCK_M1; the dQ kernel's key blocks, BLOCK_N2), in both dQ modes, against the float64 golden:
    packed sequences with 1 and BLOCK_M2 + 1 queries and keys shifted by r + t B from the diagonal (r in -2..2,
    t in 0, 1, B the smaller of the two blocks), for one config per (BLOCK_M1, BLOCK_N2) pair shipped."""
    tiles = {}
    for cfg in shipped_configs():
        tiles.setdefault((cfg.BLOCK_M1, cfg.BLOCK_N2), cfg)
    dev = device()
    for cfg in tiles.values():
        step = min(cfg.BLOCK_M1, cfg.BLOCK_N2)
        assert cfg.BLOCK_N1 % cfg.BLOCK_M1 == 0 and cfg.BLOCK_M2 % cfg.BLOCK_N2 == 0, "residues assume multiples"
        lens_q, lens_k = [], []
        for sq in (1, cfg.BLOCK_M2 + 1):
            for shift in (r + t * step for t in (0, 1) for r in range(-2, 3)):
                lens_q.append(sq)
                lens_k.append(max(sq + shift, 0))
        cu_q = torch.tensor([0] + lens_q, device=dev).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + lens_k, device=dev).cumsum(0).to(torch.int32)
        q, k, v, dout = (torch.randn(n, 1, 16, device=dev).half() for n in (sum(lens_q), sum(lens_k), sum(lens_k),
                                                                                 sum(lens_q)))
        for window, causal in (((-1, -1), True), ((step, -1), True), ((step - 1, 2), False)):
            kw = dict(scale=0.25, causal=causal, window=window)
            out, lse = torch.empty_like(q), torch.empty(1, q.shape[0], device=dev)
            golden, baseline = [[], [], []], [[], [], []]
            for i in range(len(lens_q)):
                sl_q, sl_k = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
                o, l, g, bl = golden_and_baseline(q[None, sl_q], k[None, sl_k], v[None, sl_k], dout[None, sl_q],
                                                  **kw)
                out[sl_q], lse[:, sl_q] = o[0], l[0]
                for n in range(3):
                    golden[n].append(g[n][0])
                    baseline[n].append(bl[n][0])
            golden = [torch.cat(g) for g in golden]
            baseline = [torch.cat(b) for b in baseline]
            allowance = allowances(q, k, v, dout, out, lse, cu_q=cu_q, cu_k=cu_k, **kw)
            for deterministic in (False, True):
                grads = launch(dout, q, k, v, out, lse, cu_q=cu_q, cu_k=cu_k, deterministic=deterministic,
                               config=cfg, **kw)
                check(grads, golden, baseline, allowance,
                      f"{cfg} causal={causal} window={window} deterministic={deterministic}")


@pytest.mark.gpu
def test_gpu_long_sequence_d128():
    b, s, hq, hkv, d = 1, 1024, 4, 2, 128
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v, dout = make(b, s, s, hq, hkv, d, dtype)
        for deterministic in (False, True):
            out, lse, golden, baseline = golden_and_baseline(q, k, v, dout, scale=d ** -0.5, causal=True)
            dq, dk, dv = launch(dout, q, k, v, out, lse, scale=d ** -0.5, causal=True,
                                deterministic=deterministic)
            check((dq, dk, dv), golden, baseline,
                  allowances(q, k, v, dout, out, lse, scale=d ** -0.5, causal=True),
                  f"{dtype} deterministic={deterministic}")


# ---- static code generation --------------------------------------------------------------------------------------
MODULE = "turbokernels.kernels.attention_bwd"
COMMON = {"q_ptr": "*{dt}", "dout_ptr": "*{dt}", "k_ptr": "*{dt}", "v_ptr": "*{dt}", "lse_ptr": "*fp32",
          "delta_ptr": "*fp32"}
TAIL = {"cu_q_ptr": "*i32", "cu_k_ptr": "*i32", "alibi_ptr": "*fp32", "seqlen_q": "i32", "seqlen_k": "i32"}
STRIDES = ["stride_qb", "stride_qm", "stride_qh", "stride_dob", "stride_dom", "stride_doh", "stride_kb",
           "stride_kn", "stride_kh", "stride_vb", "stride_vn", "stride_vh", "stride_lseb", "stride_lseh",
           "stride_lsem", "stride_deltab", "stride_deltah", "stride_deltam", "stride_dqb", "stride_dqm",
           "stride_dqh"]
SCALARS = {"stride_ab": "i32", "stride_ah": "i32", "scale": "fp32", "softcap": "fp32", "window_left": "i32",
           "window_right": "i32"}
UNIT = {"stride_qd": 1, "stride_dod": 1, "stride_kd": 1, "stride_vd": 1}  # the JIT specializes unit strides
# Multiples of 16 as the JIT would see them for contiguous inputs (heads * head_dim and seqlen * heads * d).
ALIGNED = ("q_ptr", "dout_ptr", "k_ptr", "v_ptr", "lse_ptr", "delta_ptr", "dq_ptr", "dk_ptr", "dv_ptr",
           "stride_qb", "stride_qm", "stride_dob", "stride_dom", "stride_kb", "stride_kn", "stride_vb", "stride_vn",
           "stride_dqb", "stride_dqm", "stride_dkb", "stride_dkn", "head_dim")


def _signature(kernel, dt):
    sig = dict(COMMON)
    if kernel == "dkdv":
        sig.update(dq_ptr="*fp32", dk_ptr="*{dt}", dv_ptr="*{dt}")
    else:
        sig.update(dq_ptr="*{dt}")
    sig.update(TAIL)
    sig["head_dim"] = "i32"
    strides = STRIDES + (["stride_dkb", "stride_dkn", "stride_dkh"] if kernel == "dkdv" else [])
    sig.update({s: "i32" for s in strides})
    sig.update(SCALARS)
    return tuple((k, v.format(dt=dt)) for k, v in sig.items())


def codegen_cases():
    """(id, capability, kernel, rows of its main dots, job): every shipped config, both kernels, at the head dim of
    its bucket: causal in fp16 and bf16 (bf16 not at 256), every feature on (varlen, softcap, ALiBi, window) in
    fp16, and the dK/dV kernel both with the atomic dQ (deterministic=False) and without."""
    from turbokernels.kernels.attention_bwd import CONFIGS
    for cap, table in sorted(CONFIGS.items()):
        for d, cfgs in sorted(table.items()):
            for cfg in cfgs:
                variants = [(dt, False) for dt in (("fp16", "bf16") if d <= 128 else ("fp16",))] + [("fp16", True)]
                for (dt, full), kernel, atomic in itertools.product(variants, ("dkdv", "dq"), (True, False)):
                    flags = dict(VARLEN=full, WINDOW=True, SOFTCAP=full, ALIBI=full, UPCAST=False, GROUP=2,
                                 BLOCK_D=d, **UNIT)
                    if kernel == "dkdv":
                        consts = dict(flags, BLOCK_M=cfg.BLOCK_M1, BLOCK_N=cfg.BLOCK_N1, ATOMIC_DQ=atomic)
                        rows, warps, stages = cfg.BLOCK_N1, cfg.warps1, cfg.stages1
                        mode = "-atomic" if atomic else "-det"
                    elif atomic:
                        continue
                    else:
                        consts = dict(flags, BLOCK_M=cfg.BLOCK_M2, BLOCK_N=cfg.BLOCK_N2)
                        rows, warps, stages = cfg.BLOCK_M2, cfg.warps2, cfg.stages2
                        mode = ""
                    sig = _signature(kernel, dt)
                    aligned = tuple(a for a in ALIGNED if a in dict(sig))
                    job = CodegenJob(f"{MODULE}:attention_bwd_{kernel}_kernel", sig, tuple(consts.items()), cap,
                                     warps, stages, aligned)
                    name = (f"sm{cap}-d{d}-{kernel}-{consts['BLOCK_M']}x{consts['BLOCK_N']}-w{warps}-p{stages}"
                            f"-{dt}-{'full' if full else 'causal'}{mode}")
                    yield name, cap, kernel, rows, job


CODEGEN_CASES = list(dict((c[0], c) for c in codegen_cases()).values())


@pytest.fixture(scope="module")
def codegen_reports():
    reason = skip_reason_no_ptxas()
    if reason is not None:
        pytest.skip(reason)
    return dict(zip([c[0] for c in CODEGEN_CASES], compile_triton([c[4] for c in CODEGEN_CASES])))


@pytest.mark.parametrize("name,cap,kernel,rows", [c[:4] for c in CODEGEN_CASES], ids=[c[0] for c in CODEGEN_CASES])
def test_codegen(codegen_reports, name, cap, kernel, rows):
    """Zero spills, shared memory within the part's limit, tensor cores. Which ones, as verified with triton 3.8
    and 3.6: on sm_90 the compiler picks wgmma when the tile of the kernel's main dots has 64+ rows (BLOCK_N of
    the dK/dV kernel, BLOCK_M of the dQ kernel) and mma.sync below that (wgmma's M is 64 per warpgroup); the
    dK/dV kernel's atomic dQ dot has BLOCK_M rows (< 64 in every shipped config) and stays on mma.sync even when
    its other dots use wgmma. sm_80 has mma.sync only."""
    from turbokernels.kernels.int4_mm import SHARED_MEMORY_LIMIT
    report = codegen_reports[name]
    print(f"{name}: {report.registers} registers, {report.spill_bytes} B spills, {report.shared_bytes} B shared, "
          f"{report.count('wgmma.mma_async')} wgmma / {report.count('mma.sync.aligned')} mma.sync in PTX")
    assert report.spill_bytes == 0, f"register spills: {report.ptxas_log}"
    assert report.shared_bytes <= SHARED_MEMORY_LIMIT[cap], f"{report.shared_bytes} B shared memory"
    if cap >= 90 and rows >= 64:
        assert report.uses_wgmma and report.count(r"HGMMA", in_sass=True) > 0, "expected wgmma on sm_90"
    else:
        assert report.uses_mma and report.count(r"HMMA", in_sass=True) > 0, "expected mma.sync tensor-core ops"
        assert not report.uses_wgmma

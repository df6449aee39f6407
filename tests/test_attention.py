"""attention: every runnable forward backend against a float64 golden (FlashAttention's rule: at most 2x the error
of the reference computed in the inputs' own dtype, plus one ulp), varlen against a per-sequence loop, the ops
(opcheck, autograd, torch.compile), bad inputs, and the Triton forward's static code generation."""
import importlib
import math
import sys

import pytest
import torch

import turbokernels as tk
from turbokernels import backends
from turbokernels.reference import attention as ref
from turbokernels.testing import (CodegenJob, assert_close, attention_allowance, compile_triton, exp_error,
                                  operand_dtype, skip_reason_no_ptxas)
from conftest import RecordingMode, interpreting, serving_spy

ops_attention = importlib.import_module("turbokernels.ops.attention")
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def runnable_backends():
    """torch's fused kernels (the `torch` backend) are its CPU ones: held to the same tests on CPU tensors."""
    return (["reference"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])
            + (["torch"] if device() == "cpu" else []))


def declined(backend_name, kw) -> bool:
    """Calls the backend cannot run exactly (softcap is no additive mask for torch's kernel): a forced call must
    raise BackendUnavailable naming the reason, never compute something else."""
    return backend_name == "torch" and kw.get("softcap", 0.0) > 0


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def qkv(batch, sq, sk, hq, hkv, d, dtype, dev=None):
    dev = dev or device()
    return (torch.randn(batch, sq, hq, d, device=dev).to(dtype), torch.randn(batch, sk, hkv, d, device=dev).to(dtype),
            torch.randn(batch, sk, hkv, d, device=dev).to(dtype))


def _ref_kwargs(kw):
    return {k: v for k, v in kw.items() if k not in ("deterministic", "max_seqlen_q", "max_seqlen_k")}


def assert_lse_close(lse, golden, baseline, allowance, what):
    """lse is fp32 with -inf exactly where the golden has no key; elsewhere the rule of testing.assert_close."""
    assert lse.dtype == torch.float32 and lse.shape == golden.shape, what
    assert_close(lse, golden, baseline, allowance=allowance, what=f"{what} lse")


def allowances(backend_name, q, k, v, **kw):
    """(out, lse) allowances of `backend_name` for these inputs (P rounded to q's dtype on tensor cores and in
    torch's CPU kernel; torch's approximate exp)."""
    return attention_allowance(q, k, v, operand_dtype=operand_dtype(backend_name, q.dtype),
                               exp_error=exp_error(backend_name, q.dtype), **kw)


def check_forward(backend_name, q, k, v, what="", **kw):
    """Run tk.attention on `backend_name` and compare out and lse with the float64 golden."""
    if declined(backend_name, kw):
        with tk.backend(backend_name), pytest.raises(tk.BackendUnavailable, match="softcap"):
            tk.attention(q, k, v, **kw)
        return None
    with tk.backend(backend_name):
        out, lse = tk.attention(q, k, v, return_lse=True, **kw)
    d = torch.float64
    golden, golden_lse = ref.attention(q.to(d), k.to(d), v.to(d), **_ref_kwargs(kw))
    baseline, baseline_lse = ref.attention(q, k, v, compute_dtype=q.dtype, **_ref_kwargs(kw))
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    what = f"{backend_name} {q.dtype} q{tuple(q.shape)} k{tuple(k.shape)} {kw} {what}"
    a_out, a_lse = allowances(backend_name, q, k, v, **_ref_kwargs(kw))
    assert_close(out, golden, baseline, allowance=a_out, what=what)
    assert_lse_close(lse, golden_lse, baseline_lse, a_lse, what)
    return out, lse


def alibi(*shape):
    return torch.rand(*shape, device=device()) * 0.5 + 0.05


def with_alibi(kw, batch, hq):
    """A case's kwargs with alibi_slopes "per_head" / "per_batch" made into slopes of that shape."""
    kw = dict(kw)
    if kw.get("alibi_slopes") == "per_head":
        kw["alibi_slopes"] = alibi(hq)
    elif kw.get("alibi_slopes") == "per_batch":
        kw["alibi_slopes"] = alibi(batch, hq)
    return kw


# (batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, kwargs): FlashAttention's odd lengths, every head-dim
# bucket, GQA/MQA, bottom-right causal both ways, windows, softcap, ALiBi.
CASES = [
    (2, 1, 1, 2, 2, 64, {}),
    (1, 17, 17, 4, 4, 40, dict(causal=True)),
    (2, 97, 113, 4, 2, 80, {}),
    (1, 113, 203, 4, 1, 96, dict(causal=True)),
    (1, 203, 113, 2, 1, 128, dict(causal=True)),
    (1, 239, 1, 2, 2, 64, dict(causal=True)),        # only the last row sees the key
    (1, 97, 129, 2, 2, 256, dict(softmax_scale=0.3)),
    (2, 97, 97, 4, 2, 59, dict(window_size=(16, 8))),
    (1, 113, 97, 2, 2, 64, dict(window_size=(-1, 5))),
    (1, 97, 113, 2, 1, 64, dict(window_size=(7, -1), causal=True)),
    (1, 97, 97, 2, 2, 32, dict(softcap=2.0)),
    (2, 97, 113, 4, 2, 64, dict(alibi_slopes="per_head", causal=True)),
    (2, 61, 70, 2, 2, 16, dict(alibi_slopes="per_batch", softcap=3.0, window_size=(20, 3))),
    (1, 17, 33, 2, 1, 1, dict(causal=True)),       # head dims below the 16-wide tile
    (1, 33, 17, 2, 2, 8, {}),
]


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}:{c[4]}-d{c[5]}-" +
                         "-".join(f"{k}={v}" for k, v in c[6].items()))
def test_forward_matches_golden(backend_name, dtype, case):
    batch, sq, sk, hq, hkv, d, kw = case
    kw = with_alibi(kw, batch, hq)
    check_forward(backend_name, *qkv(batch, sq, sk, hq, hkv, d, dtype), **kw)


def cpu_kernel_built() -> bool:
    return device() == "cpu" and backends.check_extension_op("decode_attention", "cpu")(torch.empty(1)) is None


# A few query rows per sequence: attention_fwd's `cpu` backend (decode_attention's C++ kernel over all keys), the
# CPU default for these calls: no keys, one, a split span (4097, 2100 keys), GQA/MQA, rows without keys (Sq > Sk,
# causal), windows on both sides with and without causality, softcap, ALiBi on both sides of a row.
FEW_ROW_CASES = [
    (2, 1, 1, 2, 2, 64, {}),
    (3, 1, 97, 8, 2, 128, dict(causal=True)),
    (1, 1, 4097, 4, 1, 64, {}),
    (2, 1, 300, 6, 3, 80, dict(window_size=(40, -1))),
    (2, 1, 113, 4, 2, 40, dict(window_size=(-1, 5), softmax_scale=0.3)),
    (1, 1, 203, 2, 1, 32, dict(softcap=2.0)),
    (2, 1, 170, 4, 2, 64, dict(alibi_slopes="per_head", causal=True)),
    (2, 1, 61, 2, 2, 16, dict(alibi_slopes="per_batch", softcap=3.0, window_size=(20, 3))),
    (1, 1, 33, 2, 1, 1, dict(causal=True)),
    (2, 1, 0, 2, 1, 64, {}),
    (2, 4, 97, 4, 2, 64, {}),
    (1, 16, 113, 4, 1, 96, dict(causal=True)),
    (2, 5, 3, 2, 2, 32, dict(causal=True)),
    (1, 7, 61, 4, 2, 40, dict(window_size=(9, 4))),
    (2, 3, 50, 2, 2, 16, dict(alibi_slopes="per_batch", window_size=(-1, 2))),
    (1, 16, 2100, 2, 1, 64, dict(causal=True, softcap=4.0)),
]


@pytest.mark.skipif(not cpu_kernel_built(), reason="the CPU C++ kernel")
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("case", FEW_ROW_CASES, ids=lambda c: f"b{c[0]}-q{c[1]}-k{c[2]}-h{c[3]}:{c[4]}-d{c[5]}-" +
                         "-".join(f"{k}={v}" for k, v in c[6].items()))
def test_cpu_backend_few_query_rows(dtype, case):
    """attention with a few query rows per sequence on the cpu backend (chosen automatically up to
    CPU_MAX_ROWS rows: the call without a forced backend gives the same bits; past it the kernel, turbokernels._C.
    attention_rows, is called directly) against the float64 golden, out and lse; SDPA's layout (the transformers and
    scaled_dot_product_attention paths) gives the same bits again."""
    batch, sq, sk, hq, hkv, d, kw = case
    kw = with_alibi(kw, batch, hq)
    q, k, v = qkv(batch, sq, sk, hq, hkv, d, dtype)
    if sq > ops_attention.CPU_MAX_ROWS:
        from turbokernels import _ext
        scale = kw.get("softmax_scale", d ** -0.5)
        wl, wr = kw.get("window_size", (-1, -1))
        out, lse = _ext.C.attention_rows(q, k, v, kw.get("alibi_slopes"), scale, kw.get("causal", False), wl, wr,
                                         kw.get("softcap", 0.0), False, True)
        f64 = torch.float64
        golden, golden_lse = ref.attention(q.to(f64), k.to(f64), v.to(f64), **kw)
        baseline, baseline_lse = ref.attention(q, k, v, compute_dtype=q.dtype, **kw)
        a_out, a_lse = allowances("cpu", q, k, v, **kw)
        assert_close(out, golden, baseline, allowance=a_out, what=f"attention_rows {case}")
        assert_lse_close(lse, golden_lse, baseline_lse, a_lse, f"attention_rows {case}")
        return
    out, lse = check_forward("cpu", q, k, v, **kw)
    auto_out, auto_lse = tk.attention(q, k, v, return_lse=True, **kw)
    assert torch.equal(auto_out, out) and torch.equal(auto_lse, lse)
    assert torch.equal(tk.attention(q, k, v, **kw), out)  # the path without the lse
    # SDPA's is_causal is top-left aligned: the same call only where that is the spec's (Sq == Sk)
    causal = kw.get("causal", False)
    if set(kw) <= {"causal", "softmax_scale"} and sk > 0 and dtype != torch.float64 and (not causal or sq == sk):
        o = tk.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            is_causal=causal, scale=kw.get("softmax_scale"), enable_gqa=hq != hkv)
        assert torch.equal(o.transpose(1, 2), out)


@pytest.mark.skipif(not cpu_kernel_built(), reason="the CPU C++ kernel")
def test_cpu_backend_declines_more_rows_and_varlen():
    q, k, v = qkv(1, 2, 9, 2, 2, 32, torch.float32)
    with tk.backend("cpu"), pytest.raises(tk.BackendUnavailable, match="2 query rows per sequence"):
        tk.attention(q, k, v)
    assert backends.select("attention_fwd", q, k, v, None, None, None, 0.2, False, -1, -1, 0.0)[0] == "torch"
    cu = torch.tensor([0, 1], dtype=torch.int32)
    with tk.backend("cpu"), pytest.raises(tk.BackendUnavailable, match="varlen"):
        tk.attention(q[0, :1], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32))


def fast_entry_built() -> bool:
    from turbokernels import _ext
    return device() == "cpu" and _ext.available() and hasattr(_ext.C, "attention_usual")


@pytest.mark.skipif(not fast_entry_built(), reason="the extension's one-call entry")
def test_usual_cpu_call_in_one_cxx_call(monkeypatch):
    """attention's usual CPU call goes through turbokernels._C.attention_usual (the checks, the backend choice, the
    mask of a window, of the bottom-right causal edge or of ALiBi, and the kernel in C++): the same bits as the op on
    the backend it would choose; the calls it does not serve (softcap, slopes it does not take, requires_grad, a
    dispatch mode, the profiler, a forced backend, bad input) get None there and the Python path's result or
    error."""
    served = []
    monkeypatch.setattr(ops_attention, "_fast", serving_spy(ops_attention._resolve_fast(), served))
    f32 = torch.float32
    for (b, sq, sk, hq, hkv, d, kw) in [(2, 5, 5, 4, 2, 32, dict(causal=True)), (1, 7, 9, 2, 2, 16, {}),
                                        (2, 1, 40, 6, 3, 64, dict(causal=True)), (1, 3, 3, 2, 1, 8,
                                                                                dict(softmax_scale=0.5))]:
        q, k, v = qkv(b, sq, sk, hq, hkv, d, f32)
        served.clear()
        out = tk.attention(q, k, v, **kw)
        assert served == [True]
        op_out = ops_attention.attention_fwd(q, k, v, None, None, None, kw.get("softmax_scale", d ** -0.5),
                                             kw.get("causal", False), -1, -1, 0.0)[0]
        assert torch.equal(out, op_out), (sq, sk, kw)
    slopes = torch.tensor([0.5, 0.25])
    for (b, sq, sk, hq, hkv, d, kw) in [(1, 4, 6, 2, 2, 16, dict(causal=True)),  # masks: the edge, windows, ALiBi
                                        (2, 6, 6, 2, 1, 16, dict(window_size=(2, -1))),
                                        (1, 5, 9, 2, 2, 8, dict(causal=True, window_size=(3, 0))),
                                        (2, 7, 7, 2, 2, 16, dict(causal=True, alibi_slopes=slopes)),
                                        (2, 3, 8, 2, 2, 16, dict(alibi_slopes=slopes[None].repeat(2, 1))),
                                        (1, 1, 9, 2, 2, 16, dict(causal=True, alibi_slopes=slopes)),
                                        (1, 600, 600, 2, 2, 8, dict(causal=True, alibi_slopes=slopes))]:
        q, k, v = qkv(b, sq, sk, hq, hkv, d, f32)
        served.clear()
        out = tk.attention(q, k, v, **kw)
        assert served == [True], kw
        ws = kw.get("window_size", (-1, -1))
        op_out = ops_attention.attention_fwd(q, k, v, None, None, kw.get("alibi_slopes"), d ** -0.5,
                                             kw.get("causal", False), ws[0], ws[1], 0.0)[0]
        assert torch.equal(out, op_out), (sq, sk, kw)
    q, k, v = qkv(1, 4, 6, 2, 2, 16, f32)
    for kw in (dict(softcap=2.0), dict(alibi_slopes=slopes.double()), dict(alibi_slopes=torch.ones(4)[::2])):
        served.clear()  # the reference; slopes the Python path checks (and converts, or refuses)
        try:
            out = tk.attention(q, k, v, **kw)
        except TypeError:  # float64 slopes: refused, by the Python path
            assert served == [False] and kw["alibi_slopes"].dtype == torch.float64
            continue
        assert served == [False], kw
        with tk.backend("reference"):
            ref_out = tk.attention(q, k, v, **kw)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    # with autograd (a C++ autograd node running the torch backend's forward and backward): the op's output and
    # gradients, bit for bit (the op's path: a forced backend), rows without keys included; one query row and float64
    # go to the op's autograd
    for (b, sq, sk, hq, hkv, d, kw) in [(2, 6, 6, 4, 2, 16, dict(causal=True)), (1, 9, 4, 2, 2, 8, dict(causal=True)),
                                        (1, 7, 7, 2, 1, 16, dict(window_size=(2, 1))),
                                        (2, 5, 5, 2, 2, 16, dict(causal=True, alibi_slopes=slopes,
                                                                 deterministic=True))]:
        for dtype in (f32, torch.bfloat16):
            q, k, v = qkv(b, sq, sk, hq, hkv, d, dtype)
            dout = torch.randn(q.shape).to(dtype)
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            served.clear()
            out = tk.attention(*leaves, **kw)
            grads = torch.autograd.grad(out, leaves, dout)
            assert served == [True], kw
            op_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            with tk.backend("torch"):
                op_out = tk.attention(*op_leaves, **kw)
            op_grads = torch.autograd.grad(op_out, op_leaves, dout)
            assert torch.equal(out, op_out) and all(map(torch.equal, grads, op_grads)), (sq, sk, kw, dtype)
    for (sq, dtype) in ((1, f32), (4, torch.float64)):
        q, k, v = qkv(1, sq, 6, 2, 2, 16, dtype)
        served.clear()
        qg = q.clone().requires_grad_()
        tk.attention(qg, k, v, causal=False).sum().backward()
        assert served == [False] and qg.grad is not None
    q, k, v = qkv(1, 4, 6, 2, 2, 16, f32)

    served.clear()
    with RecordingMode() as seen:
        tk.attention(q, k, v)
    assert served == [False] and any("turbokernels.attention_fwd" in o for o in seen.ops)
    served.clear()
    with torch.profiler.profile() as prof:
        tk.attention(q, k, v)
    assert served == [False] and any("turbokernels::attention_fwd" in e.name for e in prof.events())
    served.clear()
    with tk.backend("torch"):
        tk.attention(q, k, v)
    assert served == []
    with pytest.raises(ValueError, match=r"attention\(v\): shape"):
        tk.attention(q, k[..., :8], v)
    with pytest.raises(TypeError, match=r"attention\(k\)"):
        tk.attention(q, k.double(), v)


def test_cxx_call_args_are_the_python_ones():
    """The torch backend's masks (windows, the bottom-right causal edge, ALiBi, and the causal edge baked into the
    mask up to BAKE_CAUSAL_MAX_SK keys) built in C++ (turbokernels._C.torch_attention_call_args, which the one-call
    entry and _call_args use) are the Python steps' (_build_call_args): the same is_causal, rows and mask bits."""
    from turbokernels import _ext
    from turbokernels.ops import _torch_attention as ta
    if not (_ext.available() and hasattr(_ext.C, "torch_attention_call_args")):
        pytest.skip("turbokernels._C without torch_attention_call_args")
    slopes = torch.exp2(-8.0 * torch.arange(1, 5) / 4)
    cases = [(sq, sk, s, causal, wl, wr, dt)
             for sq, sk in ((1, 9), (5, 5), (4, 11), (9, 4), (600, 600), (513, 513))
             for s in (None, slopes, slopes[None].repeat(2, 1) * torch.tensor([[1.0], [0.5]]))
             for causal, wl, wr in ((True, -1, -1), (False, 2, -1), (False, -1, 3), (True, 3, 0), (False, 1, 1))
             for dt in (torch.float32, torch.bfloat16, torch.float64)]
    for sq, sk, s, causal, wl, wr, dt in cases:
        is_causal, mask, rows = ta._build_call_args(sq, sk, s, causal, wl, wr, dt, torch.device("cpu"), 1)
        c_causal, c_mask, a, b = _ext.C.torch_attention_call_args(sq, sk, s, causal, wl, wr, dt)
        what = (sq, sk, None if s is None else tuple(s.shape), causal, wl, wr, dt)
        assert c_causal == is_causal and (rows or (0, sq)) == (a, b), what
        assert (mask is None) == (c_mask is None), what
        if mask is not None:
            assert c_mask.dtype == mask.dtype and torch.equal(c_mask, mask), what
    # the edge baked into the mask up to 512 keys, left to is_causal past that
    assert ta._build_call_args(512, 512, slopes, True, -1, -1, torch.float32, torch.device("cpu"), 1)[0] is False
    assert ta._build_call_args(513, 513, slopes, True, -1, -1, torch.float32, torch.device("cpu"), 1)[0] is True


def _varlen_inputs(seqlens_q, seqlens_k, hq, hkv, d, dtype):
    cu_q = torch.tensor([0] + seqlens_q, device=device()).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + seqlens_k, device=device()).cumsum(0).to(torch.int32)
    q = torch.randn(sum(seqlens_q), hq, d, device=device()).to(dtype)
    k = torch.randn(sum(seqlens_k), hkv, d, device=device()).to(dtype)
    v = torch.randn(sum(seqlens_k), hkv, d, device=device()).to(dtype)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("backend_name", runnable_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_varlen_matches_per_sequence_loop(backend_name, dtype):
    """Packed sequences (including an empty one and one without keys) against the dense function per sequence;
    max_seqlen given as a tensor is accepted and never read."""
    seqlens_q, seqlens_k = [17, 1, 0, 97, 5], [23, 5, 3, 80, 0]
    hq, hkv, d = 4, 2, 48
    q, k, v, cu_q, cu_k = _varlen_inputs(seqlens_q, seqlens_k, hq, hkv, d, dtype)
    slopes = alibi(len(seqlens_q), hq)
    kw = dict(causal=True, alibi_slopes=slopes, softcap=0.0 if backend_name == "torch" else 4.0)
    with tk.backend(backend_name):
        out, lse = tk.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True,
                                max_seqlen_q=torch.tensor(97), max_seqlen_k=None, **kw)
        assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
        for b in range(len(seqlens_q)):
            q0, q1, k0, k1 = cu_q[b].item(), cu_q[b + 1].item(), cu_k[b].item(), cu_k[b + 1].item()
            if q1 == q0:
                continue
            o_b, lse_b = tk.attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], return_lse=True,
                                      causal=True, alibi_slopes=slopes[b], softcap=kw["softcap"])
            torch.testing.assert_close(out[q0:q1], o_b[0], atol=0, rtol=0)
            torch.testing.assert_close(lse[:, q0:q1], lse_b[0], atol=0, rtol=0)
    assert (out[cu_q[4]:cu_q[5]] == 0).all() and (lse[:, cu_q[4]:cu_q[5]] == float("-inf")).all()
    golden, golden_lse = ref.attention(q.double(), k.double(), v.double(), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                       **kw)
    baseline, baseline_lse = ref.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, compute_dtype=dtype, **kw)
    a_out, a_lse = allowances(backend_name, q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
    assert_close(out, golden, baseline, allowance=a_out, what=f"varlen {backend_name}")
    assert_lse_close(lse, golden_lse, baseline_lse, a_lse, f"varlen {backend_name}")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_rows_without_keys_give_zero_not_nan(backend_name):
    q, k, v = qkv(1, 40, 8, 2, 2, 64, torch.float16)
    with tk.backend(backend_name):
        out, lse = tk.attention(q, k, v, causal=True, return_lse=True)  # rows 0..31: i + 8 - 40 < 0
        assert (out[:, :32] == 0).all() and (lse[:, :, :32] == float("-inf")).all()
        assert not out.isnan().any() and torch.isfinite(lse[:, :, 32:]).all()
        # a window that misses every key for some rows: right edge < 0 relative to the diagonal is impossible,
        # but a window (0, 0) with fewer keys than queries leaves the top rows empty
        out2 = tk.attention(q, k, v, window_size=(0, 0))
        assert (out2[:, :32] == 0).all() and not out2.isnan().any()
        empty_k = tk.attention(q, k[:, :0], v[:, :0], return_lse=True)
        assert (empty_k[0] == 0).all() and (empty_k[1] == float("-inf")).all()
        empty_q = tk.attention(q[:, :0], k, v)
        assert empty_q.shape == (1, 0, 2, 64)


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_strided_inputs(backend_name):
    """(B, H, S, D) tensors seen through transposes, a packed qkv projection, a non-contiguous head dim."""
    B, S, H, D = 2, 37, 4, 64
    qt = torch.randn(B, H, S, D, device=device(), dtype=torch.float16).transpose(1, 2)  # strides (H*S*D, D, S*D, 1)
    qkv_packed = torch.randn(B, S, 3, H, D, device=device(), dtype=torch.float16)
    k, v = qkv_packed[:, :, 1], qkv_packed[:, :, 2]
    check_forward(backend_name, qt, k, v, causal=True, what="transposed q, packed k/v")
    q_odd = torch.randn(B, S, H, 2 * D, device=device(), dtype=torch.float16)[..., ::2]  # head-dim stride 2
    check_forward(backend_name, q_odd, k, v, what="head dim stride 2")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_lse_against_logsumexp(backend_name):
    q, k, v = qkv(2, 33, 45, 2, 2, 64, torch.float32)
    with tk.backend(backend_name):
        _, lse = tk.attention(q, k, v, softmax_scale=0.2, return_lse=True)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * 0.2
    golden = torch.logsumexp(scores, dim=-1)
    baseline = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.2, dim=-1)
    _, a_lse = allowances(backend_name, q, k, v, softmax_scale=0.2)
    assert_close(lse, golden, baseline, allowance=a_lse, what="lse")


@pytest.mark.parametrize("backend_name", runnable_backends())
def test_deterministic(backend_name):
    q, k, v = qkv(1, 70, 90, 4, 2, 64, torch.float16)
    with tk.backend(backend_name):
        a = tk.attention(q, k, v, causal=True, deterministic=True)
        b = tk.attention(q, k, v, causal=True, deterministic=True)
    assert torch.equal(a, b)


def test_deterministic_backward_repeats():
    q, k, v = (t.requires_grad_() for t in qkv(1, 33, 41, 4, 2, 32, torch.float32))
    grads = []
    for _ in range(2):
        with tk.backend("reference"):
            tk.attention(q, k, v, causal=True, deterministic=True).square().sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
        for t in (q, k, v):
            t.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_every_triton_config_is_correct(monkeypatch):
    """Each shipped config (all architectures) on dense and varlen inputs with a causal GQA mask, NaN-poisoned
    outputs so an element the kernel forgets to write fails the test; the varlen search scans 2 sequences a step."""
    if "triton" not in runnable_backends():
        pytest.skip("triton cannot run here")
    import turbokernels.kernels.attention_fwd as kernel_module
    from turbokernels.kernels.attention_fwd import CONFIGS, attention_fwd as launch
    monkeypatch.setattr(kernel_module, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    monkeypatch.setattr(kernel_module, "SEQ_CHUNK", 2)  # the varlen sequence search crosses chunks
    head_dims = {64: 48, 128: 96, 256: 160}
    seen = set()
    for arch in CONFIGS.values():
        for bucket, cfgs in arch.items():
            for cfg in cfgs:
                if (bucket, cfg) in seen:
                    continue
                seen.add((bucket, cfg))
                d = head_dims[bucket]
                q, k, v = qkv(1, 45, 100, 4, 2, d, torch.float16)
                args = (None, None, None, 1 / math.sqrt(d), True, 30, -1, 0.0)
                out, lse = launch(q, k, v, *args, config=cfg)
                golden, golden_lse = ref.attention(q.double(), k.double(), v.double(), causal=True,
                                                   window_size=(30, -1))
                baseline, baseline_lse = ref.attention(q, k, v, causal=True, window_size=(30, -1),
                                                       compute_dtype=q.dtype)
                a_out, a_lse = allowances("triton", q, k, v, causal=True, window_size=(30, -1))
                assert_close(out, golden, baseline, allowance=a_out, what=f"{cfg} d={d}")
                assert_lse_close(lse, golden_lse, baseline_lse, a_lse, f"{cfg} d={d}")
                qv, kv, vv, cu_q, cu_k = _varlen_inputs([3, 0, 80, 20], [5, 2, 70, 0], 2, 1, d, torch.float16)
                out, lse = launch(qv, kv, vv, cu_q, cu_k, None, 0.1, True, -1, -1, 0.0, config=cfg)
                golden, golden_lse = ref.attention(qv.double(), kv.double(), vv.double(), causal=True,
                                                   softmax_scale=0.1, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
                baseline, baseline_lse = ref.attention(qv, kv, vv, causal=True, softmax_scale=0.1, cu_seqlens_q=cu_q,
                                                       cu_seqlens_k=cu_k, compute_dtype=qv.dtype)
                a_out, a_lse = allowances("triton", qv, kv, vv, causal=True, softmax_scale=0.1, cu_seqlens_q=cu_q,
                                          cu_seqlens_k=cu_k)
                assert_close(out, golden, baseline, allowance=a_out, what=f"varlen {cfg} d={d}")
                assert_lse_close(lse, golden_lse, baseline_lse, a_lse, f"varlen {cfg} d={d}")


def edge_sweep(block_m, block_n):
    """(seqlens_q, seqlens_k) of packed sequences that put the causal / window edges of some query tile on every
    offset -2..2 from a key-block boundary: 1, BLOCK_M - 1 and BLOCK_M + 1 rows, keys shifted by r + t BLOCK_N
    (r in -2..2, t in 0, 1) from the bottom-right diagonal. An off-by-one in the kernels' block ranges (which
    blocks to visit, which need no mask) only shows when an edge sits on such a boundary."""
    lens_q, lens_k = [], []
    for sq in (1, block_m - 1, block_m + 1):
        for shift in (r + t * block_n for t in (0, 1) for r in range(-2, 3)):
            lens_q.append(sq)
            lens_k.append(max(sq + shift, 0))
    return lens_q, lens_k


def mask_edge_variants(block_n):
    """causal; causal with a left window of one block (its left edge on the same boundaries); a two-sided
    window (left edge one key before a boundary, right edge two keys after the diagonal)."""
    return [dict(causal=True), dict(causal=True, window_size=(block_n, -1)), dict(window_size=(block_n - 1, 2))]


def edge_tiles(configs):
    """One tile shape per key-block width among `configs` (the smallest BLOCK_M with it): the block-range logic
    depends on BLOCK_N and on BLOCK_M being a multiple of it, not on the rest of the config."""
    tiles = {}
    for cfg in sorted(configs, key=lambda c: c.BLOCK_M):
        tiles.setdefault(cfg.BLOCK_N, cfg)
    return [tiles[n] for n in sorted(tiles)]


def test_mask_edges():
    """The causal and window edges swept across the key-block boundaries of every key-block width the forward
    ships (see edge_sweep), against the float64 golden: what the shapes of the other tests can hide behind a
    block's width."""
    if "triton" not in runnable_backends():
        pytest.skip("triton cannot run here")
    from turbokernels.kernels.attention_fwd import CONFIGS, attention_fwd as launch
    for cfg in edge_tiles([cfg for table in CONFIGS.values() for cfgs in table.values() for cfg in cfgs]):
        assert cfg.BLOCK_M % cfg.BLOCK_N == 0, "edge_sweep's residues assume BLOCK_M is a multiple of BLOCK_N"
        lens_q, lens_k = edge_sweep(cfg.BLOCK_M, cfg.BLOCK_N)
        q, k, v, cu_q, cu_k = _varlen_inputs(lens_q, lens_k, 1, 1, 16, torch.float16)
        for kw in mask_edge_variants(cfg.BLOCK_N):
            window = kw.get("window_size", (-1, -1))
            out, lse = launch(q, k, v, cu_q, cu_k, None, 0.25, kw.get("causal", False), window[0], window[1], 0.0,
                              config=cfg)
            golden, golden_lse = ref.attention(q.double(), k.double(), v.double(), softmax_scale=0.25,
                                               cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **kw)
            a_out, a_lse = allowances("triton", q, k, v, softmax_scale=0.25, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                      **kw)
            what = f"tile {cfg.BLOCK_M}x{cfg.BLOCK_N} {kw}"
            assert_close(out, golden, allowance=a_out, what=what)
            assert_lse_close(lse, golden_lse, None, a_lse, what)


TORCH_STEP_CASES = [  # (sq, sk, hq, hkv, dtype, kw): rows without keys, windows, GQA, ALiBi, float64, a NaN row
    (5, 9, 4, 2, torch.float32, dict(causal=True)),
    (9, 5, 2, 2, torch.bfloat16, dict(causal=True)),  # the first rows have no key
    (17, 17, 2, 1, torch.float16, dict(window_size=(3, 2))),
    (7, 23, 2, 2, torch.float64, dict(causal=True, window_size=(4, -1))),
    (6, 6, 2, 2, torch.float32, dict(alibi_slopes=True, causal=True)),
]


@pytest.mark.parametrize("nan_row", [False, True])
@pytest.mark.parametrize("case", TORCH_STEP_CASES, ids=lambda c: f"{c[0]}x{c[1]}-{c[2]}/{c[3]}-{c[4]}-{c[5]}")
def test_torch_backend_cxx_steps_equal_python_steps(monkeypatch, case, nan_row):
    """The torch backend's C++ call (turbokernels._C.torch_attention_fwd: views, kernel, rows without keys, the
    NaN-row repair, the lse copy) gives the bits of its Python steps (_bhsd, the path without the extension), for
    out and lse, in both layouts it takes."""
    ta = importlib.import_module("turbokernels.ops._torch_attention")
    from turbokernels import _ext
    if device() != "cpu" or not _ext.available() or getattr(_ext.C, "torch_attention_fwd", None) is None:
        pytest.skip("needs the CPU extension with torch_attention_fwd")
    sq, sk, hq, hkv, dtype, kw = case
    q, k, v = qkv(2, sq, sk, hq, hkv, 16, dtype, "cpu")
    if nan_row:
        q[1, sq - 1, 0] = float("nan")  # the last row, which has keys in every case
    slopes = torch.rand(hq) * 0.5 if kw.get("alibi_slopes") else None
    causal, (wl, wr) = kw.get("causal", False), kw.get("window_size", (-1, -1))
    args = (slopes, 0.3, causal, wl, wr)
    with_cxx = [ta._dense_fwd(q, k, v, *args, want_lse=want) for want in (True, False)]
    bhsd_cxx = ta._run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), False, *args, True)
    monkeypatch.setattr(ta, "_cxx_fwd", None)
    monkeypatch.setattr(ta, "_cxx_resolved", True)
    with_py = [ta._dense_fwd(q, k, v, *args, want_lse=want) for want in (True, False)]
    bhsd_py = ta._run(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), False, *args, True)
    for (o1, l1), (o2, l2) in zip(with_cxx + [bhsd_cxx], with_py + [bhsd_py]):
        assert o1.shape == o2.shape and o1.stride() == o2.stride()
        torch.testing.assert_close(o1, o2, rtol=0, atol=0, equal_nan=True)
        assert (l1 is None) == (l2 is None)
        if l1 is not None:
            assert l1.dtype == torch.float32 and l1.is_contiguous()
            torch.testing.assert_close(l1, l2, rtol=0, atol=0, equal_nan=True)
    if nan_row:
        assert with_cxx[0][0][1, sq - 1, 0].isnan().all() and with_cxx[0][1][1, 0, sq - 1].isnan()
    if sq > sk and causal:  # rows [0, sq - sk) have no key: out 0, lse -inf
        assert (with_cxx[0][0][:, :sq - sk] == 0).all() and (with_cxx[0][1][..., :sq - sk] == -math.inf).all()


# ---- backward (reference: the spec the Triton backward must match) ----------------------------------------------
@pytest.mark.parametrize("kw", [dict(causal=True), dict(softcap=1.5, alibi_slopes="per_head", window_size=(5, 2))],
                         ids=["causal", "softcap-alibi-window"])
def test_reference_backward_is_the_gradient(kw):
    """The explicit backward formulas against torch autograd through the reference forward, in float64, GQA
    with seqlen_q != seqlen_k."""
    kw = dict(kw)
    if kw.get("alibi_slopes") == "per_head":
        kw["alibi_slopes"] = alibi(4)
    q, k, v = (t.double().requires_grad_() for t in qkv(2, 13, 19, 4, 2, 16, torch.float32))
    dout = torch.randn(q.shape, dtype=torch.float64, device=device())
    with tk.backend("reference"):
        out = tk.attention(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    out_ag, _ = ref.attention(q, k, v, **kw)
    gq, gk, gv = torch.autograd.grad(out_ag, (q, k, v), dout)
    for a, b, name in ((dq, gq, "dq"), (dk, gk, "dk"), (dv, gv, "dv")):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_reference_backward_varlen():
    seqlens_q, seqlens_k = [5, 0, 9], [7, 3, 4]
    q, k, v, cu_q, cu_k = _varlen_inputs(seqlens_q, seqlens_k, 2, 1, 16, torch.float64)
    q, k, v = q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    with tk.backend("reference"):
        out = tk.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_ag, _ = ref.attention(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, causal=True)
    for a, b in zip(grads, torch.autograd.grad(out_ag, (q, k, v), dout)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_triton_backward_registration_reports_missing_kernel(monkeypatch):
    monkeypatch.setattr(ops_attention.importlib.util, "find_spec", lambda name, *a: None)
    q, k, v = qkv(1, 4, 4, 2, 2, 16, torch.float16)
    reason = backends.registered("attention_bwd")["triton"].check(q, q, k, v)
    assert reason == "kernels/attention_bwd.py not available"


# ---- ops: opcheck and torch.compile --------------------------------------------------------------------------
def _fwd_args(q, k, v, **over):
    args = dict(cu_seqlens_q=None, cu_seqlens_k=None, alibi_slopes=None, softmax_scale=0.25, causal=True,
                window_left=-1, window_right=-1, softcap=0.0)
    args.update(over)
    return (q, k, v, *args.values())


def test_opcheck_forward():
    op = torch.ops.turbokernels.attention_fwd.default
    for dtype in (torch.float32, torch.float16):
        q, k, v = qkv(1, 5, 7, 4, 2, 16, dtype, dev="cpu")
        torch.library.opcheck(op, _fwd_args(q, k, v))
    q, k, v = (t.requires_grad_() for t in qkv(2, 5, 7, 2, 1, 16, torch.float32, dev="cpu"))
    torch.library.opcheck(op, _fwd_args(q, k, v, alibi_slopes=torch.rand(2), softcap=2.0, window_left=3))
    qv, kv, vv, cu_q, cu_k = _varlen_inputs([3, 4], [5, 2], 2, 2, 16, torch.float32)
    torch.library.opcheck(op, _fwd_args(qv.cpu().requires_grad_(), kv.cpu(), vv.cpu(), cu_seqlens_q=cu_q.cpu(),
                                        cu_seqlens_k=cu_k.cpu()))
    if "triton" in runnable_backends() and device() == "cpu":
        with tk.backend("triton"):
            torch.library.opcheck(op, _fwd_args(*qkv(1, 5, 7, 4, 2, 16, torch.float16, dev="cpu")),
                                  test_utils=("test_schema", "test_faketensor"))


def test_opcheck_backward():
    op = torch.ops.turbokernels.attention_bwd.default
    q, k, v = qkv(1, 5, 7, 4, 2, 16, torch.float32, dev="cpu")
    out, lse = torch.ops.turbokernels.attention_fwd(*_fwd_args(q, k, v))
    args = (torch.randn_like(out), q, k, v, out, lse, None, None, None, 0.25, True, -1, -1, 0.0, True)
    with tk.backend("reference"):
        torch.library.opcheck(op, args)
    if "triton" in runnable_backends() and backends.registered("attention_bwd")["triton"].check(*args) is None:
        h = tuple(t.half() if t.dtype == torch.float32 and t is not lse else t for t in args[:6])
        with tk.backend("triton"):
            torch.library.opcheck(op, h + args[6:], test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_forward_and_backward():
    """Traced through the fake impls (no graph break), gradients through register_autograd -> attention_bwd."""
    def fn(q, k, v, cu_q, cu_k):
        dense = tk.attention(q, k, v, causal=True)
        packed = tk.attention(q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
                              cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=q.shape[1])
        return dense.square().sum() + packed.reshape(q.shape).sum()

    q, k, v = qkv(2, 9, 11, 4, 2, 16, torch.float32, dev="cpu")
    cu_q = torch.tensor([0, 9, 18], dtype=torch.int32)
    cu_k = torch.tensor([0, 11, 22], dtype=torch.int32)
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = fn(*inputs, cu_q, cu_k)
    expected_grads = torch.autograd.grad(expected, inputs)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    got = compiled(*inputs, cu_q, cu_k)
    got_grads = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


# ---- bad input --------------------------------------------------------------------------------------------------
def _bad(**over):
    q, k, v = qkv(2, 8, 8, 4, 2, 16, torch.float16, dev="cpu")
    args = dict(q=q, k=k, v=v)
    args.update(over)
    return args


BAD = [
    (lambda: _bad(q=torch.randn(8, 4, 16).half()), ValueError, r"attention\(q\): expected \(batch"),
    (lambda: _bad(k=torch.randn(3, 8, 2, 16).half(), v=torch.randn(3, 8, 2, 16).half()), ValueError,
     r"attention\(k\): batch"),
    (lambda: _bad(v=torch.randn(2, 9, 2, 16).half()), ValueError, r"attention\(v\): shape"),
    (lambda: _bad(k=torch.randn(2, 8, 3, 16).half(), v=torch.randn(2, 8, 3, 16).half()), ValueError,
     r"attention\(k\): heads_q=4 must be a multiple of heads_kv=3"),
    (lambda: _bad(q=torch.randn(2, 8, 4, 300).half(), k=torch.randn(2, 8, 2, 300).half(),
                  v=torch.randn(2, 8, 2, 300).half()), ValueError, r"attention\(q\): head_dim must be in 1..256"),
    (lambda: _bad(k=torch.randn(2, 8, 2, 32).half(), v=torch.randn(2, 8, 2, 32).half()), ValueError,
     r"attention\(k\): head_dim 32"),
    (lambda: _bad(k=torch.randn(2, 8, 2, 16)), TypeError, r"attention\(k\): dtype"),
    (lambda: _bad(q=torch.randn(2, 8, 4, 16).to(torch.int32)), TypeError, r"attention\(q\): dtype"),
    (lambda: _bad(window_size=(-2, 0)), ValueError, r"attention\(window_size\): must be >= -1"),
    (lambda: _bad(window_size=3), TypeError, r"attention\(window_size\)"),
    (lambda: _bad(softcap=-1.0), ValueError, r"attention\(softcap\)"),
    (lambda: _bad(softmax_scale="x"), TypeError, r"attention\(softmax_scale\)"),
    (lambda: _bad(alibi_slopes=torch.rand(4).half()), TypeError, r"attention\(alibi_slopes\): dtype"),
    (lambda: _bad(alibi_slopes=torch.rand(3)), ValueError, r"attention\(alibi_slopes\): expected shape"),
    (lambda: _bad(cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)), ValueError,
     r"attention\(cu_seqlens_k\): .*together"),
    (lambda: _bad(q=torch.randn(8, 4, 16).half(), k=torch.randn(8, 2, 16).half(), v=torch.randn(8, 2, 16).half(),
                  cu_seqlens_q=torch.tensor([0, 8]), cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
     TypeError, r"attention\(cu_seqlens_q\): dtype must be torch.int32"),
    (lambda: _bad(q=torch.randn(8, 4, 16).half(), k=torch.randn(8, 2, 16).half(), v=torch.randn(8, 2, 16).half(),
                  cu_seqlens_q=torch.tensor([[0, 8]], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
     ValueError, r"attention\(cu_seqlens_q\): expected shape"),
    (lambda: _bad(q=torch.randn(8, 4, 16).half(), k=torch.randn(8, 2, 16).half(), v=torch.randn(8, 2, 16).half(),
                  cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32),
                  cu_seqlens_k=torch.tensor([0, 8], dtype=torch.int32)),
     ValueError, r"attention\(cu_seqlens_k\): shape"),
    (lambda: _bad(max_seqlen_q=torch.tensor([1, 2])), ValueError, r"attention\(max_seqlen_q\)"),
    (lambda: _bad(max_seqlen_k=2.5), TypeError, r"attention\(max_seqlen_k\)"),
    (lambda: _bad(q=[1.0]), TypeError, r"attention\(q\): expected a torch.Tensor"),
]


@pytest.mark.parametrize("make,exc,match", BAD, ids=[b[2].split(":")[0].replace("\\", "") + f"-{i}"
                                                     for i, b in enumerate(BAD)])
def test_bad_inputs_name_the_argument(make, exc, match):
    with pytest.raises(exc, match=match):
        tk.attention(**make())


def test_devices_must_match():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    q, k, v = qkv(1, 4, 4, 2, 2, 16, torch.float16, dev="cpu")
    with pytest.raises(ValueError, match=r"attention\(k\): is on"):
        tk.attention(q, k.cuda(), v)


def test_cu_seqlens_values_are_always_checked():
    """No debug flag needed (formerly TURBOKERNELS_DEBUG): on the CPU directly; on CUDA with torch._assert_async
    (tests/test_bad_inputs.py has the full table)."""
    q, k, v = torch.randn(8, 2, 16).half(), torch.randn(8, 2, 16).half(), torch.randn(8, 2, 16).half()
    good = torch.tensor([0, 2, 4, 8], dtype=torch.int32)
    for bad, match in (([0, 6, 4, 8], "must be non-decreasing"), ([1, 2, 4, 8], "must start at 0"),
                       ([0, 2, 4, 7], r"must end at the packed length 8 \(q.shape\[0\]\), got 7")):
        with pytest.raises(ValueError, match=r"attention\(cu_seqlens_q\): " + match):
            tk.attention(q, k, v, cu_seqlens_q=torch.tensor(bad, dtype=torch.int32), cu_seqlens_k=good)
    tk.attention(q, k, v, cu_seqlens_q=good, cu_seqlens_k=good)


def test_forced_triton_rejects_float64():
    q, k, v = qkv(1, 4, 4, 2, 2, 16, torch.float64, dev="cpu")
    with tk.backend("triton"), pytest.raises(tk.BackendUnavailable, match="float64"):
        tk.attention(q, k, v)


# ---- static code generation of every shipped forward config --------------------------------------------------
FWD_KERNEL = "turbokernels.kernels.attention_fwd:attention_fwd_kernel"
FWD_SIGNATURE = {
    "q_ptr": "*{dt}", "k_ptr": "*{dt}", "v_ptr": "*{dt}", "out_ptr": "*{dt}", "lse_ptr": "*fp32",
    "cu_seqlens_q_ptr": "*i32", "cu_seqlens_k_ptr": "*i32", "alibi_ptr": "*fp32",
    **{f"stride_{t}{s}": "i32" for t in "qkvo" for s in "bsh"},
    "stride_lb": "i32", "stride_lh": "i32", "stride_ls": "i32", "stride_ab": "i32",
    "seqlen_q": "i32", "seqlen_k": "i32", "num_seqs": "i32", "kv_group": "i32",
    "qk_scale": "fp32", "softcap_scale": "fp32", "softcap_log2": "fp32", "window_left": "i32", "window_right": "i32",
}
# what the launcher's JIT sees as multiples of 16 for head dims 64/128 (pointers and row/head/batch strides)
FWD_ALIGNED = ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "lse_ptr", "stride_qb", "stride_qs", "stride_qh", "stride_kb",
               "stride_ks", "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_ob", "stride_os", "stride_oh")


def fwd_codegen_cases():
    """(id, capability, config, job): every config at the head dims of its bucket (64 and 128 share the 64/128
    tables' neighbours: d=64 for the 64 bucket, d=128 for 128, d=256 for 256), fp16 and bf16, causal (all three
    key loops) and, for fp16, a varlen sliding-window variant with softcap and ALiBi (every feature on)."""
    from turbokernels.kernels.attention_fwd import CONFIGS
    for cap, table in sorted(CONFIGS.items()):
        for bucket, cfgs in sorted(table.items()):
            for cfg in cfgs:
                for dt, full in (("fp16", False), ("bf16", False), ("fp16", True)):
                    constexprs = dict(HEAD_DIM=bucket, HEAD_DIM_PAD=bucket, BLOCK_M=cfg.BLOCK_M,
                                      BLOCK_N=cfg.BLOCK_N, RIGHT_BOUNDED=True, LEFT_BOUNDED=full,
                                      HAS_SOFTCAP=full, HAS_ALIBI=full, VARLEN=full, SEQ_CHUNK=64,
                                      UPCAST=False)
                    job = CodegenJob(FWD_KERNEL, tuple((k, v.format(dt=dt)) for k, v in FWD_SIGNATURE.items()),
                                     tuple(constexprs.items()), cap, cfg.num_warps, cfg.num_stages, FWD_ALIGNED)
                    name = (f"sm{cap}-d{bucket}-{cfg.BLOCK_M}x{cfg.BLOCK_N}-w{cfg.num_warps}-p{cfg.num_stages}-{dt}"
                            f"{'-varlen-window-softcap-alibi' if full else '-causal'}")
                    yield name, cap, cfg, job


FWD_CASES = list(fwd_codegen_cases())


@pytest.fixture(scope="module")
def fwd_reports():
    return dict(zip([c[0] for c in FWD_CASES], compile_triton([c[3] for c in FWD_CASES])))


@pytest.mark.skipif(skip_reason_no_ptxas() is not None, reason=str(skip_reason_no_ptxas()))
@pytest.mark.parametrize("name,cap,cfg", [c[:3] for c in FWD_CASES], ids=[c[0] for c in FWD_CASES])
def test_attention_fwd_codegen(fwd_reports, name, cap, cfg):
    from turbokernels.kernels.int4_mm import SHARED_MEMORY_LIMIT
    report = fwd_reports[name]
    assert report.spill_bytes == 0, f"register spills: {report.ptxas_log}"
    assert report.shared_bytes <= SHARED_MEMORY_LIMIT[cap], f"{report.shared_bytes} B shared memory"
    if cap >= 90 and cfg.BLOCK_M >= 64:
        assert report.uses_wgmma and report.count(r"HGMMA", in_sass=True) > 0, "expected wgmma on sm_90"
    else:
        assert report.uses_mma and report.count(r"HMMA", in_sass=True) > 0, "expected mma.sync tensor-core ops"
        assert not report.uses_wgmma


# ---- GPU (skipped without CUDA) ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_forward_d128_s1024(dtype, causal):
    q, k, v = qkv(2, 1024, 1024, 8, 2, 128, dtype, dev="cuda")
    check_forward("triton", q, k, v, causal=causal)

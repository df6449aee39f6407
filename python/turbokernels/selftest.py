"""`turbokernels selftest`: every op on every backend that can run here, against the float64 golden result.

Each op runs on a couple of odd shapes in fp16, bf16 and fp32 through its public function (tk.int4_linear,
tk.attention, ...) under `with tk.backend(name)`, and is judged by the tests' tolerance rule
(turbokernels.testing: the derived per-element bound, plus FlashAttention's 2x check against torch's same-dtype
result where the tests use it). kv_cache_append must be exact. A backend that cannot run a call here is listed as
skipped with the reason its check gives (the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before
triton is imported for CPU tensors: interpreted, slow). The exit code is 1 when any check fails.

    run(ops=None, quick=False) -> Report     in-process (tests)
    main(ops=None, quick=False) -> int        prints the table (the CLI)
"""
from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import Callable, Optional

import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass
class Row:
    op: str
    backend: str
    dtype: str
    shape: str
    max_error: float = float("nan")
    max_bound: float = float("nan")
    ratio: float = float("nan")       # the largest error / bound over the elements (<= 1 passes rule (1))
    ok: bool = False
    note: str = ""                    # why it failed (the assertion's message), or what was checked


@dataclasses.dataclass
class Report:
    rows: list[Row]
    skipped: dict[tuple[str, str], str]   # (op, backend) -> why it could not run (some or all cases)
    seconds: float

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.ok]


@dataclasses.dataclass
class _Result:
    """What one backend produced, with what to compare it to: (name, ours, golden, baseline or None, allowance)."""
    outputs: list[tuple[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor], object]]
    exact: bool = False


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _randn(gen, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


# ---- cases: each returns a function backend -> _Result ----------------------------------------------------------
def _add_bias(golden, baseline, bias):
    """The golden x @ W + bias in float64; torch's same-dtype baseline adds the bias in the inputs' dtype."""
    if bias is None:
        return golden, baseline
    return golden + bias.double(), baseline + bias


def _int4_mm(gen, dev, dtype, shape):
    import turbokernels as tk
    from turbokernels.testing import int4_dequant_magnitudes, matmul_allowance, operand_dtype
    M, K, N, g, with_bias = shape
    w = tk.quantize_int4(_randn(gen, N, K, dtype=dtype), group_size=g).to(dev)
    x = _randn(gen, M, K, dtype=dtype, device=dev)
    bias = _randn(gen, N, dtype=dtype, device=dev) if with_bias else None
    w64 = w.dequantize(torch.float64).t()  # the exact q * scale + offset, (K, N)
    golden, baseline = _add_bias(x.double() @ w64, x @ w.dequantize(dtype).t(), bias)

    def run(name):
        out = tk.int4_linear(x, w, bias)
        allowance = matmul_allowance(x, w64, bias=bias, operand_dtype=operand_dtype(name, dtype, "int4_mm"),
                                     dequant_magnitudes=int4_dequant_magnitudes(w, name))
        return _Result([("out", out, golden, baseline, allowance)])
    return run, f"M={M} K={K} N={N} g={g}" + (" bias" if with_bias else "")


def _w4a8_mm(gen, dev, dtype, shape):
    """Its spec's golden: the activations quantized as reference/w4a8_mm.py says, then the exact product."""
    import turbokernels as tk
    from turbokernels.reference.w4a8_mm import dequantize_activations, quantize_activations
    from turbokernels.testing import int4_dequant_magnitudes, matmul_allowance
    M, K, N, g, with_bias = shape
    w = tk.quantize_int4(_randn(gen, N, K, dtype=dtype), group_size=g).to(dev)
    x = _randn(gen, M, K, dtype=dtype, device=dev)
    bias = _randn(gen, N, dtype=dtype, device=dev) if with_bias else None
    xhat = dequantize_activations(*quantize_activations(x), dtype=torch.float64)
    w64 = w.dequantize(torch.float64).t()
    golden = xhat @ w64 if bias is None else xhat @ w64 + bias.double()

    def run(name):
        out = tk.w4a8_linear(x, w, bias)
        allowance = matmul_allowance(xhat, w64, bias=bias, dequant_magnitudes=int4_dequant_magnitudes(w, name))
        return _Result([("out", out, golden, None, allowance)])
    return run, f"M={M} K={K} N={N} g={g}" + (" bias" if with_bias else "")


def _sparse24_mm(gen, dev, dtype, shape):
    import turbokernels as tk
    from turbokernels.testing import matmul_allowance
    M, N, K, with_bias = shape
    w = tk.prune_24(_randn(gen, N, K)).to(dtype=dtype, device=dev)
    weight = tk.Sparse24Weight.from_dense(w)
    x = _randn(gen, M, K, dtype=dtype, device=dev)
    bias = _randn(gen, N, dtype=dtype, device=dev) if with_bias else None
    golden, baseline = _add_bias(x.double() @ w.double().t(), x @ w.t(), bias)

    def run(name):
        out = tk.sparse24_linear(x, weight, bias)
        return _Result([("out", out, golden, baseline, matmul_allowance(x, w.t(), bias=bias))])
    return run, f"M={M} N={N} K={K}" + (" bias" if with_bias else "")


def _sparse24_int4_mm(gen, dev, dtype, shape):
    import turbokernels as tk
    from turbokernels.testing import int4_dequant_magnitudes, matmul_allowance, operand_dtype
    M, N, K, g, with_bias = shape
    w = tk.prune_24(_randn(gen, N, K)).to(dtype=dtype, device=dev)
    weight = tk.Sparse24Int4Weight.from_dense(w, group_size=g)
    x = _randn(gen, M, K, dtype=dtype, device=dev)
    bias = _randn(gen, N, dtype=dtype, device=dev) if with_bias else None
    w64 = weight.dequantize(torch.float64)
    golden, baseline = _add_bias(x.double() @ w64.t(), x @ w64.to(dtype).t(), bias)

    def run(name):
        out = tk.sparse24_int4_linear(x, weight, bias)
        allowance = matmul_allowance(x, w64.t(), bias=bias, operand_dtype=operand_dtype(name, dtype),
                                     dequant_magnitudes=int4_dequant_magnitudes(weight, name))
        return _Result([("out", out, golden, baseline, allowance)])
    return run, f"M={M} N={N} K={K} g={g}" + (" bias" if with_bias else "")


def _attention_inputs(gen, dev, dtype, shape):
    B, sq, sk, hq, hkv, d, causal = shape
    q = _randn(gen, B, sq, hq, d, dtype=dtype, device=dev)
    k = _randn(gen, B, sk, hkv, d, dtype=dtype, device=dev)
    v = _randn(gen, B, sk, hkv, d, dtype=dtype, device=dev)
    what = f"B={B} sq={sq} sk={sk} h={hq}/{hkv} d={d}" + (" causal" if causal else "")
    return q, k, v, causal, what


def _attention_fwd(gen, dev, dtype, shape):
    import turbokernels as tk
    from turbokernels.reference import attention as ref
    from turbokernels.testing import attention_allowance, exp_error, operand_dtype
    q, k, v, causal, what = _attention_inputs(gen, dev, dtype, shape)
    golden, golden_lse = ref.attention(q.double(), k.double(), v.double(), causal=causal)
    baseline, baseline_lse = ref.attention(q, k, v, causal=causal, compute_dtype=dtype)

    def run(name):
        out, lse = tk.attention(q, k, v, causal=causal, return_lse=True)
        a_out, a_lse = attention_allowance(q, k, v, causal=causal, operand_dtype=operand_dtype(name, dtype),
                                           exp_error=exp_error(name, dtype))
        return _Result([("out", out, golden, baseline, a_out), ("lse", lse, golden_lse, baseline_lse, a_lse)])
    return run, what


def _attention_bwd(gen, dev, dtype, shape):
    """Gradients through autograd (the op's backward) against the spec's float64 gradients; rule (1) only (the
    tests' backward baseline is their own same-dtype autograd, not repeated here)."""
    import turbokernels as tk
    from turbokernels.reference import attention as ref
    from turbokernels.testing import attention_bwd_allowance, bwd_output_partials, operand_dtype
    q, k, v, causal, what = _attention_inputs(gen, dev, dtype, shape)
    dout = _randn(gen, *q.shape, dtype=dtype, device=dev)
    scale = q.shape[-1] ** -0.5
    golden = ref.attention_bwd(dout.double(), q.double(), k.double(), v.double(), None, None, None, None, None,
                               scale, causal, -1, -1, 0.0, True)

    def run(name):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out, lse = tk.attention(*leaves, causal=causal, return_lse=True)
        grads = torch.autograd.grad(out, leaves, dout)
        allowances = attention_bwd_allowance(q, k, v, dout, out.detach(), lse, causal=causal,
                                             operand_dtype=operand_dtype(name, dtype),
                                             output_partials=bwd_output_partials(name))
        return _Result([(n, g, gold, None, a) for n, g, gold, a in zip(("dq", "dk", "dv"), grads, golden,
                                                                           allowances)])
    return run, what


def _decode_inputs(gen, dev, dtype, shape):
    B, T, hq, hkv, d, S, page_size = shape
    q = _randn(gen, B, T, hq, d, dtype=dtype, device=dev)
    k = _randn(gen, B, S, hkv, d, dtype=dtype, device=dev)
    v = _randn(gen, B, S, hkv, d, dtype=dtype, device=dev)
    lens = torch.tensor([S - 3 * b for b in range(B)], dtype=torch.int32, device=dev)
    block_table = None
    if page_size:  # the logical cache in shuffled pages
        pages = math.ceil(S / page_size)
        perm = torch.randperm(B * pages, generator=gen).to(device=dev, dtype=torch.int32).view(B, pages)
        pad = pages * page_size - S
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
        k_cache = torch.empty(B * pages, page_size, hkv, d, dtype=dtype, device=dev)
        v_cache = torch.empty_like(k_cache)
        k_cache[perm.long()] = k.view(B, pages, page_size, hkv, d)
        v_cache[perm.long()] = v.view(B, pages, page_size, hkv, d)
        k, v, block_table = k_cache, v_cache, perm
    what = f"B={B} T={T} h={hq}/{hkv} d={d} S={S}" + (f" paged{page_size}" if page_size else "")
    return q, k, v, lens, block_table, what


def _decode_attention(gen, dev, dtype, shape):
    import turbokernels as tk
    from turbokernels.reference.decode_attention import decode_attention as reference
    from turbokernels.testing import decode_allowance, exp_error, operand_dtype
    q, k_cache, v_cache, lens, block_table, what = _decode_inputs(gen, dev, dtype, shape)
    scale = q.shape[-1] ** -0.5
    args = (lens, block_table, None, scale, -1, -1, 0.0)
    golden = reference(q.double(), k_cache.double(), v_cache.double(), *args)
    baseline = reference(q, k_cache, v_cache, *args, compute_dtype=dtype)

    def run(name):
        out = tk.decode_attention(q, k_cache, v_cache, lens, block_table=block_table)
        allowance = decode_allowance(q, k_cache, v_cache, *args, operand_dtype=operand_dtype(name, dtype),
                                     exp_error=exp_error(name, dtype))
        return _Result([("out", out, golden, baseline, allowance)])
    return run, what


def _kv_cache_append(gen, dev, dtype, shape):
    """Exact: the caches after the append hold the new keys/values at positions lens[b] + t (through the block
    table when paged) and are unchanged elsewhere; the returned lengths are lens + T. With a rotary_dim (the
    shape's 8th entry), the keys rotated GPT-J style (rotary_interleaved) at their position minus a left padding:
    the spec's apply_rotary, one token at a time."""
    import turbokernels as tk
    from turbokernels.reference.decode_attention import apply_rotary
    B, T, hq, hkv, d, S, page_size = shape[:7]
    rotary_dim = shape[7] if len(shape) > 7 else 0
    _, k_cache, v_cache, lens, block_table, what = _decode_inputs(gen, dev, dtype, shape[:7])
    lens = lens - T
    k_new = _randn(gen, B, T, hkv, d, dtype=dtype, device=dev)
    v_new = _randn(gen, B, T, hkv, d, dtype=dtype, device=dev)
    options = {}
    if rotary_dim:
        angles = torch.rand(S, rotary_dim // 2, generator=gen, dtype=torch.float64) * (2 * math.pi)
        options = dict(cache_leftpad=(lens // 2).to(torch.int32), rotary_cos=angles.cos().to(dtype).to(dev),
                       rotary_sin=angles.sin().to(dtype).to(dev), rotary_interleaved=True)
        what += f" rotary{rotary_dim} gptj leftpad"
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b in range(B):  # the spec, one token at a time
        for t in range(T):
            pos = int(lens[b]) + t
            row, slot = (int(block_table[b, pos // page_size]), pos % page_size) if page_size else (b, pos)
            key = k_new[b, t]
            if rotary_dim:
                at = torch.tensor([[pos - int(options["cache_leftpad"][b])]], device=dev)
                key = apply_rotary(key[None, None], options["rotary_cos"], options["rotary_sin"], at, True)[0, 0]
            want_k[row, slot], want_v[row, slot] = key, v_new[b, t]

    def run(name):
        kc, vc = k_cache.clone(), v_cache.clone()
        new_lens = tk.kv_cache_append(kc, vc, k_new, v_new, lens, block_table=block_table, **options)
        return _Result([("k_cache", kc, want_k, None, None), ("v_cache", vc, want_v, None, None),
                        ("lengths", new_lens, lens + T, None, None)], exact=True)
    return run, f"{what} +{T}"


# op -> (the torch.ops.turbokernels op whose backends are tried, case builder, shapes; the first is --quick's)
OPS: dict[str, tuple[str, Callable, list]] = {
    # the matmuls: (M, K, N, group, bias) / (M, N, K[, group], bias); the second case adds a bias
    "int4_mm": ("int4_mm", _int4_mm, [(1, 576, 97, 128, False), (17, 256, 40, 64, True)]),
    "w4a8_mm": ("w4a8_mm", _w4a8_mm, [(1, 576, 97, 128, False), (5, 200, 40, 32, True)]),
    "sparse24_mm": ("sparse24_mm", _sparse24_mm, [(1, 113, 48, False), (17, 33, 20, True)]),
    "sparse24_int4_mm": ("sparse24_int4_mm", _sparse24_int4_mm,
                         [(1, 113, 576, 128, False), (17, 17, 160, 64, True)]),
    "attention_fwd": ("attention_fwd", _attention_fwd, [(1, 17, 33, 4, 2, 40, True), (2, 33, 17, 2, 2, 64, False)]),
    "attention_bwd": ("attention_bwd", _attention_bwd, [(1, 17, 33, 2, 1, 40, True), (1, 33, 17, 2, 2, 64, False)]),
    "decode_attention": ("decode_attention", _decode_attention,
                         [(2, 1, 4, 2, 64, 97, None), (2, 2, 4, 1, 40, 64, 16)]),
    "kv_cache_append": ("kv_cache_append", _kv_cache_append,
                        [(2, 2, 4, 2, 64, 97, None), (2, 3, 4, 1, 40, 64, 16, 32)]),  # (..., rotary_dim)
}


def _judge(row: Row, result: _Result) -> None:
    """Fill row's numbers (the worst output) and ok, by the tests' rule: assert_close's AssertionError is a
    failure, recorded with its message."""
    from turbokernels.testing import assert_close, error_report
    row.ok, notes, worst = True, [], -1.0
    if result.exact:
        row.max_error, row.max_bound, row.ratio = 0.0, 0.0, 0.0
    for name, ours, golden, baseline, allowance in result.outputs:
        if result.exact:  # bound 0: equal, element for element
            same = ours.shape == golden.shape and torch.equal(ours, golden.to(ours.dtype))
            err = (ours.double() - golden.double()).abs().max().item() if ours.shape == golden.shape else math.inf
            row.max_error = max(row.max_error, err)
            if not same:
                row.ok, row.ratio = False, math.inf
                notes.append(f"{name} differs (max error {err:.3g})")
            continue
        finite = torch.isfinite(golden.double())
        err, bound, ratio, _ = error_report(ours[finite], golden[finite],
                                            allowance.map(lambda t: t.expand_as(golden)[finite]
                                                          if t.dim() else t) if allowance else None)
        if ratio > worst:
            row.max_error, row.max_bound, row.ratio, worst = err, bound, ratio, ratio
        try:
            assert_close(ours, golden, baseline, allowance=allowance, what=name)
        except AssertionError as exc:
            row.ok = False
            notes.append(str(exc).splitlines()[0])
    row.note = "; ".join(notes)


def run(ops: Optional[list[str]] = None, quick: bool = False, device: Optional[str] = None,
        backend_names: Optional[list[str]] = None, progress: Optional[Callable[[Row], None]] = None) -> Report:
    """Every op in `ops` (default: all of OPS) on every registered backend that can run here (or only those in
    backend_names). quick: the first shape of each op only. progress(row) is called after each check."""
    from turbokernels import backends
    import turbokernels as tk
    unknown = [o for o in (ops or []) if o not in OPS]
    if unknown:
        raise ValueError(f"selftest: unknown op(s) {unknown}; choose from {sorted(OPS)}")
    dev = device or _device()
    t0 = time.perf_counter()
    rows, skipped, ran = [], {}, set()
    for op in ops or list(OPS):
        torch_op, build, shapes = OPS[op]
        for shape in shapes[:1] if quick else shapes:
            for dtype in DTYPES:
                gen = torch.Generator().manual_seed(zlib.crc32(repr((op, shape, dtype)).encode()))
                case, what = build(gen, dev, dtype, shape)
                for name, impl in backends.registered(torch_op).items():
                    if backend_names is not None and name not in backend_names:
                        continue
                    row = Row(op, name, str(dtype).replace("torch.", ""), what)
                    if not backends.automatic(torch_op, name, impl, torch.device(dev)):
                        row.note = "forced only (not yet validated on a GPU): "
                    try:
                        with tk.backend(name):
                            result = case(name)
                        _judge(row, result)
                    except tk.BackendUnavailable as exc:  # its check's reason, after the op's name
                        skipped.setdefault((op, name), str(exc).split(": ", 1)[-1])
                        continue
                    except Exception as exc:  # noqa: BLE001 - a crash is a failure of this backend, not of the run
                        row.ok, row.note = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
                    rows.append(row)
                    ran.add((op, name))
                    if progress:
                        progress(row)
    skipped = {key: (f"some cases: {why}" if key in ran else why) for key, why in skipped.items()}
    return Report(rows, skipped, time.perf_counter() - t0)


HEADER = f"{'op':<17} {'backend':<9} {'dtype':<9} {'shape':<40} {'max err':>9} {'max bound':>9} {'ratio':>6}  ok"


def format_row(r: Row) -> str:
    line = (f"{r.op:<17} {r.backend:<9} {r.dtype:<9} {r.shape:<40} {r.max_error:>9.2e} {r.max_bound:>9.2e} "
            f"{r.ratio:>6.2f}  {'ok' if r.ok else 'FAIL'}")
    return line + (f"  {r.note}" if r.note else "")


def main(ops: Optional[list[str]] = None, quick: bool = False) -> int:
    """Print the table, the skipped backends and the verdict; 1 on any failure."""
    from turbokernels.backends import triton_interpreting
    print(f"turbokernels selftest on {_device()}; the tolerance rule of turbokernels.testing (ratio = max error / "
          f"bound, <= 1 passes)")
    print(HEADER)
    report = run(ops, quick, progress=lambda r: print(format_row(r), flush=True))
    for (op, name), reason in sorted(report.skipped.items()):
        print(f"skipped: {op} on {name}: {reason}")
    if any(name == "triton" for _, name in report.skipped) and not torch.cuda.is_available() \
            and not triton_interpreting():
        print("run `TRITON_INTERPRET=1 turbokernels selftest` to include the Triton kernels on a CPU "
              "(interpreted, slow: minutes)")
    bad = report.failures
    print(f"selftest: {len(report.rows) - len(bad)} passed, {len(bad)} failed, {len(report.skipped)} backends "
          f"skipped ({report.seconds:.0f} s)")
    return 1 if bad else 0

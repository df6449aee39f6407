"""Fused attention (ops attention_fwd / attention_bwd) against torch's attention backends.

Prefill: forward and backward at head dims 64/128/256, seqlens 512..16k, causal and not, bf16 (and fp16 with
--full), against every torch.nn.attention.SDPBackend that runs the case and FlexAttention; TFLOP/s (FlashAttention's
FLOP count: 4*B*H*Sq*Sk*D, halved for causal; backward 2.5x the forward) and % of the dense matmul peak measured at
the start of the run. Decode (decode_attention) has its own benchmark, bench/attention_decode.py. Medians
(triton.testing.do_bench); speedup = baseline time / our time, both measured in this run.

CPU (--device cpu): turbokernels (the automatic backend, `torch`: torch's fused CPU kernels) against
F.scaled_dot_product_attention on the same tensors, timed in turns (interleaved medians: the CPU may be shared),
fp32 and bf16, S = 128..2048 (--quick: 128 and 512), B=1 H=8 D=64: full, causal, GQA (8/2 heads), the
scaled_dot_product_attention drop-in, the forward+backward of causal; and the features SDPA has no argument for
(a causal sliding window of 256, causal ALiBi) against SDPA given the equivalent explicit mask, built beforehand
(not timed). speedup = SDPA time / ours (>= 1: not slower than torch).

    python bench/attention.py [--device cpu|cuda] [--out DIR] [--quick | --full]
    turbokernels bench attention ...
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: python bench/attention.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels.bench.common import (cpu_environment, environment, interleaved_medians, measured_roofline,  # noqa: E402
                                       median_ms, plot_speedup, write_csv)

HEAD_DIMS = (64, 128, 256)
SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS_PER_CASE = 16384  # batch = TOKENS_PER_CASE // seqlen, so every case fills the GPU
HEADS = 16


def _torch_backends():
    """(name, fn(q, k, v, causal) in (B, H, S, D)) for every SDPA backend and FlexAttention available."""
    out = []
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            if hasattr(SDPBackend, name):
                backend = getattr(SDPBackend, name)

                def run(q, k, v, causal, backend=backend):
                    with sdpa_kernel(backend):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                out.append((name.lower(), run))
    except ImportError:
        pass
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        masks = {}

        def run_flex(q, k, v, causal):
            if not causal:
                return flex(q, k, v)
            key = (q.shape[-2], k.shape[-2], q.device)
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, q.shape[-2],
                                               k.shape[-2], device=q.device)
            return flex(q, k, v, block_mask=masks[key])
        out.append(("flex_attention", run_flex))
    except ImportError:
        pass
    return out


# FlexAttention compiles once per shape (tens of seconds): only these cases unless --full.
FLEX_CASES = {(128, 2048), (128, 8192)}


def _prefill_rows(dev, dtype, roof, env, quick, full):
    rows = []
    seqlens = (1024, 4096) if quick else (SEQLENS if full else (512, 2048, 8192, 16384))
    head_dims = (128,) if quick else HEAD_DIMS
    all_baselines = _torch_backends()
    for d in head_dims:
        for s in seqlens:
            b = max(1, TOKENS_PER_CASE // s)
            for causal in (False, True):
                q, k, v = (torch.randn(b, s, HEADS, d, device=dev, dtype=dtype, requires_grad=True)
                           for _ in range(3))
                qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
                flops = 4.0 * b * HEADS * s * s * d / (2 if causal else 1)
                do = torch.randn_like(q)
                ours_f = median_ms(lambda: tk.attention(q, k, v, causal=causal), dev)
                out = tk.attention(q, k, v, causal=causal)
                ours_b = median_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True), dev)
                baselines = [(n, f) for n, f in all_baselines if n != "flex_attention" or full or (d, s) in FLEX_CASES]
                for name, fn in baselines:
                    try:
                        base_f = median_ms(lambda: fn(qt, kt, vt, causal), dev)
                        bout = fn(qt, kt, vt, causal)
                        dot = do.transpose(1, 2)
                        base_b = median_ms(lambda: torch.autograd.grad(bout, (qt, kt, vt), dot, retain_graph=True),
                                           dev)
                    except Exception as exc:  # noqa: BLE001 - a backend that does not support the case
                        print(f"  {name} d={d} s={s}: {type(exc).__name__}", flush=True)
                        continue
                    for phase, ours, base, f in (("fwd", ours_f, base_f, flops), ("bwd", ours_b, base_b, 2.5 * flops)):
                        row = dict(env, op="attention", phase=phase, dtype=str(dtype).replace("torch.", ""), batch=b,
                                   heads=HEADS, seqlen=s, head_dim=d, causal=causal, baseline=name,
                                   baseline_ms=round(base, 4), ours_ms=round(ours, 4), speedup=round(base / ours, 3),
                                   tflops=round(f / (ours * 1e-3) / 1e12, 1),
                                   baseline_tflops=round(f / (base * 1e-3) / 1e12, 1),
                                   matmul_peak_pct=round(100 * f / (ours * 1e-3) / roof["peak_flops"], 1))
                        rows.append(row)
                        print(f"{phase} {row['dtype']} d={d:<3} s={s:<5} causal={causal!s:<5} vs {name:<20} "
                              f"ours {ours:8.3f} ms {row['tflops']:6.1f} TFLOP/s ({row['matmul_peak_pct']:5.1f}% of "
                              f"peak)  base {base:8.3f} ms  {row['speedup']:.2f}x", flush=True)
                del q, k, v, qt, kt, vt, out, do
    return rows


CPU_SEQLENS = (128, 256, 512, 1024, 2048)
CPU_HEADS, CPU_HEADS_KV, CPU_HEAD_DIM, CPU_WINDOW = 8, 2, 64, 256


def _explicit_mask(s, causal, window_left, slopes, dtype):
    """The additive (H, S, S) or (S, S) mask equal to our arguments (bottom-right = top-left for square S)."""
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    allowed = torch.ones(s, s, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window_left >= 0:
        allowed &= j >= i - window_left
    mask = torch.zeros(s, s, dtype=dtype).masked_fill(~allowed, float("-inf"))
    if slopes is not None:
        mask = mask - slopes.to(dtype)[:, None, None] * (i - j).abs().to(dtype)
    return mask


def _cpu_cases(s, dtype):
    """(case, ours(), sdpa()) on one set of (B, S, H, D) tensors; SDPA gets their (B, H, S, D) views."""
    g = torch.Generator().manual_seed(s)
    q, k, v = (torch.randn(1, s, CPU_HEADS, CPU_HEAD_DIM, generator=g).to(dtype) for _ in range(3))
    kg, vg = (torch.randn(1, s, CPU_HEADS_KV, CPU_HEAD_DIM, generator=g).to(dtype) for _ in range(2))
    qt, kt, vt, kgt, vgt = (t.transpose(1, 2) for t in (q, k, v, kg, vg))
    slopes = torch.exp2(-8.0 * torch.arange(1, CPU_HEADS + 1) / CPU_HEADS)  # ALiBi's geometric slopes
    window_mask = _explicit_mask(s, True, CPU_WINDOW, None, dtype)
    alibi_mask = _explicit_mask(s, True, -1, slopes, torch.float32 if dtype != torch.float64 else dtype)[None]
    sdpa = F.scaled_dot_product_attention
    cases = [
        ("full", lambda: tk.attention(q, k, v), lambda: sdpa(qt, kt, vt)),
        ("causal", lambda: tk.attention(q, k, v, causal=True), lambda: sdpa(qt, kt, vt, is_causal=True)),
        ("gqa_causal", lambda: tk.attention(q, kg, vg, causal=True),
         lambda: sdpa(qt, kgt, vgt, is_causal=True, enable_gqa=True)),
        ("sdpa_dropin_causal", lambda: tk.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
         lambda: sdpa(qt, kt, vt, is_causal=True)),
        ("window256_causal", lambda: tk.attention(q, k, v, causal=True, window_size=(CPU_WINDOW, 0)),
         lambda: sdpa(qt, kt, vt, attn_mask=window_mask)),
        ("alibi_causal", lambda: tk.attention(q, k, v, causal=True, alibi_slopes=slopes),
         lambda: sdpa(qt, kt, vt, attn_mask=alibi_mask)),
    ]
    # forward + backward of causal attention (training on CPU): autograd through each
    ql, kl, vl = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qlt, klt, vlt = (t.detach().clone().transpose(1, 2).requires_grad_() for t in (q, k, v))
    do = torch.randn(q.shape, generator=g).to(dtype)
    dot = do.transpose(1, 2)
    cases.append(("causal_fwd_bwd",
                  lambda: torch.autograd.grad(tk.attention(ql, kl, vl, causal=True), (ql, kl, vl), do),
                  lambda: torch.autograd.grad(sdpa(qlt, klt, vlt, is_causal=True), (qlt, klt, vlt), dot)))
    return cases


def _cpu_rows(quick: bool) -> list[dict]:
    env = cpu_environment()
    print(f"# {env['device']}, torch {env['torch']}, {env['date']}: turbokernels (auto backend) vs "
          f"F.scaled_dot_product_attention, interleaved medians", flush=True)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for s in ((128, 512) if quick else CPU_SEQLENS):
            for case, ours, base in _cpu_cases(s, dtype):
                ms = interleaved_medians({"ours": ours, "sdpa": base}, min_time_s=0.5 if quick else 2.0)
                row = dict(env, op="attention", case=case, dtype=str(dtype).replace("torch.", ""), batch=1,
                           heads=CPU_HEADS, seqlen=s, head_dim=CPU_HEAD_DIM, ours_ms=round(ms["ours"], 4),
                           sdpa_ms=round(ms["sdpa"], 4), speedup=round(ms["sdpa"] / ms["ours"], 3))
                rows.append(row)
                print(f"{row['dtype']:<8} s={s:<5} {case:<20} ours {ms['ours']:9.3f} ms  sdpa {ms['sdpa']:9.3f} ms  "
                      f"{row['speedup']:.2f}x", flush=True)
    return rows


def run(out_dir: str = "bench/out", quick: bool = False, full: bool = False, device: str = "cuda") -> list[dict]:
    if device == "cpu":
        rows = _cpu_rows(quick)
        write_csv(rows, os.path.join(out_dir, "attention_cpu.csv"))
        print(f"wrote {out_dir}/attention_cpu.csv")
        return rows
    if not torch.cuda.is_available():
        print("bench attention: --device cuda needs a CUDA GPU (use --device cpu for the CPU comparison)")
        return []
    dev = torch.device("cuda")
    env = environment(dev)
    rows = []
    for dtype in (torch.bfloat16, torch.float16) if full else (torch.bfloat16,):
        roof = measured_roofline(dev, dtype)
        print(f"# {env['device']} torch {env['torch']} triton {env['triton']} {env['date']}: measured "
              f"{roof['peak_bytes_per_s'] / 1e9:.0f} GB/s, {roof['peak_flops'] / 1e12:.0f} TFLOP/s {dtype}", flush=True)
        rows += _prefill_rows(dev, dtype, roof, env, quick, full)
    write_csv(rows, os.path.join(out_dir, "attention_cuda.csv"))
    fwd = [r for r in rows if r["phase"] == "fwd" and r["head_dim"] == 128]
    plot_speedup(fwd, os.path.join(out_dir, "attention_fwd_cuda.png"), x="seqlen", y="speedup",
                 series=("dtype", "causal", "baseline"), title=f"attention forward d128: speedup — {env['device']}")
    print(f"wrote {out_dir}/attention_cuda.csv")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="bench/out")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="d=128, two seqlens")
    p.add_argument("--full", action="store_true", help="fp16 too, every seqlen, FlexAttention everywhere (slow)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.out, a.quick, a.full, a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

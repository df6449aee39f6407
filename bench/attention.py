"""Fused attention (ops attention_fwd / attention_bwd) against torch's attention backends.

Prefill: forward and backward at head dims 64/128/256, seqlens 512..16k, causal and not, bf16 (and fp16 with
--full), against every torch.nn.attention.SDPBackend that runs the case and FlexAttention; TFLOP/s (FlashAttention's
FLOP count: 4*B*H*Sq*Sk*D, halved for causal; backward 2.5x the forward) and % of the dense matmul peak measured at
the start of the run. Decode (decode_attention) has its own benchmark, bench/attention_decode.py. GPU only (the CPU
has no fast attention to compare). Medians (triton.testing.do_bench); speedup = baseline time / our time, both
measured in this run.

    python bench/attention.py [--out DIR] [--quick | --full]
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
from turbokernels.bench.common import environment, measured_roofline, median_ms, plot_speedup, write_csv  # noqa: E402

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


def run(out_dir: str = "bench/out", quick: bool = False, full: bool = False) -> list[dict]:
    if not torch.cuda.is_available():
        print("bench attention: needs a CUDA GPU (there is no fast CPU attention to compare against)")
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
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="d=128, two seqlens")
    p.add_argument("--full", action="store_true", help="fp16 too, every seqlen, FlexAttention everywhere (slow)")
    a = p.parse_args(argv)
    run(a.out, a.quick, a.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""int4 weight-only linear (op int4_mm) against dense matmul on real-model shapes.

GPU: ours (auto backend: Triton) vs cuBLAS `F.linear` in fp16 and bf16. CPU: ours (C++ `cpu` backend) vs fp32
`F.linear` (MKL/oneDNN). Both measured in the same run; medians; speedup = baseline time / our time.
Roofline: bandwidth_pct = our bytes/s over a large copy's, matmul_peak_pct = our FLOP/s over a large dense matmul's
(both measured at the start of the run), roofline_pct = the larger (the binding roof). On CPU the dense matmul is
the BLAS's rate, which the AVX-512 int4 loop can exceed (over 100% then: the BLAS is not the hardware's peak).
Weights rotate through enough copies to exceed the CPU's caches, as a model's layers do.

    python bench/int4.py [--device cpu|cuda] [--out DIR] [--quick] [--full]
    turbokernels bench int4 ...
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: python bench/int4.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels.bench.common import (copies_to_exceed_cache, environment, measured_roofline,  # noqa: E402
                                       median_ms, plot_speedup, roofline_fraction, rotating, write_csv)

# (in_features K, out_features N) of real models: Llama-3-8B attention/MLP up/MLP down, Llama-70B MLP up.
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
M_VALUES = [1, 4, 16, 64, 256, 2048]
GROUP_SIZE = 128


def _cases(device: torch.device, quick: bool, full: bool):
    if device.type == "cuda":
        shapes, ms = (SHAPES[:1], [1, 16, 2048]) if quick else (SHAPES, M_VALUES)
        return [(dt, shapes, ms) for dt in (torch.float16, torch.bfloat16)]
    if quick:
        return [(torch.float32, SHAPES[:1], [1, 16])]
    if full:
        return [(torch.float32, SHAPES, M_VALUES)]
    # the 2-core CI-class CPU: decode-sized M, where weight-only int4 is meant to win
    return [(torch.float32, SHAPES[:3], [1, 4, 16, 64])]


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False, full: bool = False) -> list[dict]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    env = environment(dev)
    rows = []
    for dtype, shapes, m_values in _cases(dev, quick, full):
        roof = measured_roofline(dev, dtype)
        print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}  "
              f"measured peak {roof['peak_bytes_per_s'] / 1e9:.0f} GB/s, {roof['peak_flops'] / 1e12:.2f} "
              f"TFLOP/s ({dtype})", flush=True)
        print(f"{'dtype':>8} {'K':>6} {'N':>6} {'M':>5} {'base ms':>9} {'ours ms':>9} {'speedup':>8} "
              f"{'TFLOP/s':>8} {'GB/s':>7} {'roof%':>6}  backend", flush=True)
        for K, N in shapes:
            dense = (torch.randn(N, K, device=dev) * 0.02).to(dtype)
            weight = tk.quantize_int4(dense, group_size=GROUP_SIZE)
            # several copies of each weight, used in turn (see common.rotating)
            next_dense = rotating([dense] + [dense.clone() for _ in range(
                copies_to_exceed_cache(dense.numel() * dense.element_size(), dev) - 1)])
            next_weight = rotating([weight] + [tk.Int4Weight(weight.qweight.clone(), weight.scales.clone(),
                                                             weight.offsets.clone(), GROUP_SIZE, K)
                                               for _ in range(copies_to_exceed_cache(weight.nbytes(), dev) - 1)])
            for M in m_values:
                x = torch.randn(M, K, device=dev, dtype=dtype)
                backend_name = tk.backends.select("int4_mm", x, weight.qweight, weight.scales, weight.offsets,
                                                  GROUP_SIZE)[0]
                base = median_ms(lambda: F.linear(x, next_dense()), dev)
                ours = median_ms(lambda: tk.int4_linear(x, next_weight()), dev)
                flops = 2.0 * M * N * K
                n_bytes = weight.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
                row = dict(env, op="int4_mm", dtype=str(dtype).replace("torch.", ""), K=K, N=N, M=M,
                           group_size=GROUP_SIZE, backend=backend_name, baseline="F.linear dense",
                           baseline_ms=round(base, 5), ours_ms=round(ours, 5), speedup=round(base / ours, 3),
                           tflops=round(flops / (ours * 1e-3) / 1e12, 3),
                           gbps=round(n_bytes / (ours * 1e-3) / 1e9, 1),
                           roofline_pct=round(100 * roofline_fraction(flops, n_bytes, ours, roof), 1),
                           bandwidth_pct=round(100 * n_bytes / (ours * 1e-3) / roof["peak_bytes_per_s"], 1),
                           matmul_peak_pct=round(100 * flops / (ours * 1e-3) / roof["peak_flops"], 1),
                           peak_gbps=round(roof["peak_bytes_per_s"] / 1e9, 1),
                           peak_tflops=round(roof["peak_flops"] / 1e12, 2))
                rows.append(row)
                print(f"{row['dtype']:>8} {K:>6} {N:>6} {M:>5} {base:>9.4f} {ours:>9.4f} {row['speedup']:>7.2f}x "
                      f"{row['tflops']:>8.3f} {row['gbps']:>7.1f} {row['roofline_pct']:>6.1f}  {backend_name}",
                      flush=True)
            del dense, weight, next_dense, next_weight
    tag = dev.type
    csv_path = os.path.join(out_dir, f"int4_{tag}.csv")
    write_csv(rows, csv_path)
    plotted = plot_speedup(rows, os.path.join(out_dir, f"int4_{tag}.png"), x="M", y="speedup",
                           series=("dtype", "K", "N"),
                           title=f"int4_mm speedup over dense F.linear, g{GROUP_SIZE} — {env['device']}")
    print(f"wrote {csv_path}" + (" and a plot" if plotted else ""))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="one shape, two M values")
    p.add_argument("--full", action="store_true", help="on CPU: all shapes and M values (slow)")
    a = p.parse_args(argv)
    run(a.device, a.out, a.quick, a.full)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

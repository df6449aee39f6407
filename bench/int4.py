"""int4 weight-only linear (op int4_mm) against dense matmul on real-model shapes.

GPU: ours (the automatic backend: Triton until a CUDA C++ kernel is verified on the GPU's architecture, see
python/turbokernels/acceptance.py) vs cuBLAS `F.linear` in fp16 and bf16 (the row's dtype); medians; speedup =
baseline time / our time. Besides: our `triton` and `cuda` backends, each forced (`with tk.backend(name)`), in
triton_ms and cuda_ms; a backend that cannot run the case (no such backend for the op yet, a _C without the kernel,
a shape its check refuses) leaves an empty cell and says why in triton_note / cuda_note. cuda_vs_cublas = cuBLAS
time / cuda time, cuda_vs_triton = triton time / cuda time (> 1: the CUDA C++ kernel is faster: the evidence the
acceptance table asks for). The CSV is rewritten after every row, so a run stopped by a timeout keeps its rows.
CPU, fp32 and bf16 activations, in interleaved rounds (bench.common.interleaved_medians), one row per case:
  ours (the C++ `cpu` backend) | dense F.linear in fp32 and in bf16 (the weight stored in that dtype, x converted
  to it: what a user who does not quantize would run) | torch's own int4 CPU kernel
  (aten._weight_int4pack_mm_for_cpu, same weight and group size, bf16 x) where this torch has it.
  speedup = fp32 F.linear / ours, vs_best_dense = the faster dense F.linear / ours (the issue's floor: >= 1 at every
  M), vs_torch_int4 = torch int4 / ours (>= 1 wanted at M <= 4).
  w4a8 columns: the opt-in mode (turbokernels.w4a8_linear: activations quantized to int8 per 32, integer dot
  products; a different result, see reference/w4a8_mm.py), same weights, same rounds: w4a8_ms, its GB/s and % of
  the copy bandwidth, and the same ratios.
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
from typing import Optional

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: python bench/int4.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels.bench.common import (copies_to_exceed_cache, environment, interleaved_medians,  # noqa: E402
                                       measured_roofline, median_ms, optional_ms, plot_speedup, ratio,
                                       roofline_fraction, rotating, rounded, write_csv)

# (in_features K, out_features N) of real models: Llama-3-8B attention/MLP up/MLP down, Llama-70B MLP up.
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
M_VALUES = [1, 4, 16, 64, 256, 2048]
GROUP_SIZE = 128
# Our backends timed on GPU besides the automatic choice, each forced.
FORCED = ("triton", "cuda")


def _cases(quick: bool):
    shapes, ms = (SHAPES[:1], [1, 16, 2048]) if quick else (SHAPES, M_VALUES)
    return [(dt, shapes, ms) for dt in (torch.float16, torch.bfloat16)]


def torch_int4_cpu(weight):
    """(pack, mm) for torch's CPU int4 kernel holding `weight` exactly ((q - 8) * s + (o + 8 s) in bf16), or None
    when this torch lacks it or rejects the shape. mm(x) takes x in any float dtype (converted to bf16)."""
    from turbokernels.formats.int4 import unpack_int4
    try:
        q = unpack_int4(weight.qweight, weight.in_features).t().contiguous().to(torch.int32)  # (N, K)
        s, o = weight.scales.float(), weight.offsets.float()
        sz = torch.stack([s, o + 8 * s], dim=-1).to(torch.bfloat16).contiguous()  # (G, N, 2)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 8)
        gs = weight.effective_group_size
        probe = torch.ops.aten._weight_int4pack_mm_for_cpu(
            torch.zeros(1, weight.in_features, dtype=torch.bfloat16), packed, gs, sz)
        assert probe.shape == (1, weight.out_features)
    except (AttributeError, RuntimeError, NotImplementedError, AssertionError):
        return None
    return packed, sz, gs


def run_cpu(out_dir: str, quick: bool, full: bool, m_values: Optional[list[int]] = None) -> list[dict]:
    dev = torch.device("cpu")
    env = environment(dev)
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    shapes = SHAPES[:1] if quick else (SHAPES if full else SHAPES[:3])
    m_values = m_values or ([1, 4, 16] if quick else (M_VALUES if full else [1, 2, 4, 16, 64]))
    roof = measured_roofline(dev, torch.float32)
    print(f"# {env['device']}  torch {env['torch']}  {env['date']}  copy {roof['peak_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"fp32 matmul {roof['peak_flops'] / 1e12:.2f} TFLOP/s", flush=True)
    print(f"{'x':>5} {'K':>6} {'N':>6} {'M':>5} {'ours ms':>8} {'fp32 ms':>8} {'bf16 ms':>8} {'tint4 ms':>8} "
          f"{'vs fp32':>8} {'vs dense':>8} {'vs tint4':>8} {'GB/s':>6} {'bw%':>5} {'w4a8 ms':>8} {'w4a8 bw%':>8} "
          f"{'vs tint4':>8}", flush=True)
    rows = []
    for K, N in shapes:
        dense32 = torch.randn(N, K) * 0.02
        weight = tk.quantize_int4(dense32, group_size=GROUP_SIZE)
        n_w = copies_to_exceed_cache(weight.nbytes(), dev)
        weights = rotating([weight] + [tk.Int4Weight(weight.qweight.clone(), weight.scales.clone(),
                                                     weight.offsets.clone(), GROUP_SIZE, K) for _ in range(n_w - 1)])
        d32 = rotating([dense32] + [dense32.clone() for _ in range(copies_to_exceed_cache(4 * N * K, dev) - 1)])
        dense16 = dense32.to(torch.bfloat16)
        d16 = rotating([dense16] + [dense16.clone() for _ in range(copies_to_exceed_cache(2 * N * K, dev) - 1)])
        t4 = torch_int4_cpu(weight)
        t4s = rotating([t4] + [(t4[0].clone(), t4[1], t4[2]) for _ in range(n_w - 1)]) if t4 else None
        for dtype in dtypes:
            for M in m_values:
                x = torch.randn(M, K).to(dtype)
                x32, x16 = x.float(), x.to(torch.bfloat16)
                fns = {"ours": lambda: tk.int4_linear(x, weights()),
                       "fp32": lambda: F.linear(x32 if dtype == torch.float32 else x.float(), d32()),
                       "bf16": lambda: F.linear(x16 if dtype == torch.bfloat16 else x.to(torch.bfloat16), d16()),
                       "w4a8": lambda: tk.w4a8_linear(x, weights())}
                if t4s is not None:
                    def torch_int4():
                        packed, sz, gs = t4s()
                        return torch.ops.aten._weight_int4pack_mm_for_cpu(
                            x16 if dtype == torch.bfloat16 else x.to(torch.bfloat16), packed, gs, sz)
                    fns["torch_int4"] = torch_int4
                ms = interleaved_medians(fns)
                n_bytes = weight.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
                best_dense = min(ms["fp32"], ms["bf16"])
                row = dict(env, op="int4_mm", dtype=str(dtype).replace("torch.", ""), K=K, N=N, M=M,
                           group_size=GROUP_SIZE, backend=tk.backends.select(
                               "int4_mm", x, weight.qweight, weight.scales, weight.offsets, GROUP_SIZE)[0],
                           baseline="F.linear fp32", ours_ms=round(ms["ours"], 5),
                           baseline_ms=round(ms["fp32"], 5), bf16_linear_ms=round(ms["bf16"], 5),
                           torch_int4_ms=round(ms["torch_int4"], 5) if "torch_int4" in ms else "",
                           speedup=round(ms["fp32"] / ms["ours"], 3),
                           vs_best_dense=round(best_dense / ms["ours"], 3),
                           vs_torch_int4=round(ms["torch_int4"] / ms["ours"], 3) if "torch_int4" in ms else "",
                           gbps=round(n_bytes / (ms["ours"] * 1e-3) / 1e9, 2),
                           bandwidth_pct=round(100 * n_bytes / (ms["ours"] * 1e-3) / roof["peak_bytes_per_s"], 1),
                           roofline_pct=round(100 * roofline_fraction(2.0 * M * N * K, n_bytes, ms["ours"], roof), 1),
                           w4a8_ms=round(ms["w4a8"], 5),
                           w4a8_gbps=round(n_bytes / (ms["w4a8"] * 1e-3) / 1e9, 2),
                           w4a8_bandwidth_pct=round(100 * n_bytes / (ms["w4a8"] * 1e-3) / roof["peak_bytes_per_s"],
                                                    1),
                           w4a8_vs_best_dense=round(best_dense / ms["w4a8"], 3),
                           w4a8_vs_torch_int4=round(ms["torch_int4"] / ms["w4a8"], 3) if "torch_int4" in ms else "",
                           peak_gbps=round(roof["peak_bytes_per_s"] / 1e9, 1),
                           peak_tflops=round(roof["peak_flops"] / 1e12, 3))
                rows.append(row)
                print(f"{row['dtype']:>5} {K:>6} {N:>6} {M:>5} {ms['ours']:>8.3f} {ms['fp32']:>8.3f} "
                      f"{ms['bf16']:>8.3f} {ms.get('torch_int4', float('nan')):>8.3f} {row['speedup']:>7.2f}x "
                      f"{row['vs_best_dense']:>7.2f}x {ms.get('torch_int4', float('nan')) / ms['ours']:>7.2f}x "
                      f"{row['gbps']:>6.1f} {row['bandwidth_pct']:>5.1f} {ms['w4a8']:>8.3f} "
                      f"{row['w4a8_bandwidth_pct']:>8.1f} {ms.get('torch_int4', float('nan')) / ms['w4a8']:>7.2f}x",
                      flush=True)
        del dense32, dense16, weight, weights, d32, d16, t4, t4s
    csv_path = os.path.join(out_dir, "int4_cpu.csv")
    write_csv(rows, csv_path)
    plotted = plot_speedup(rows, os.path.join(out_dir, "int4_cpu.png"), x="M", y="vs_best_dense",
                           series=("dtype", "K", "N"),
                           title=f"int4_mm vs the faster dense F.linear, g{GROUP_SIZE} — {env['device']}")
    print(f"wrote {csv_path}" + (" and a plot" if plotted else ""))
    return rows


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False, full: bool = False,
        m_values: Optional[list[int]] = None) -> list[dict]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cpu":
        return run_cpu(out_dir, quick, full, m_values)
    return run_gpu(dev, out_dir, quick)


def run_gpu(dev: torch.device, out_dir: str, quick: bool) -> list[dict]:
    """The GPU table (the `_cases` grid, every row by gpu_row), its CSV after every row and the plot."""
    env = environment(dev)
    rows = []
    csv_path = os.path.join(out_dir, f"int4_{dev.type}.csv")
    for dtype, shapes, m_values in _cases(quick):
        roof = measured_roofline(dev, dtype)
        print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}  "
              f"measured peak {roof['peak_bytes_per_s'] / 1e9:.0f} GB/s, {roof['peak_flops'] / 1e12:.2f} "
              f"TFLOP/s ({dtype})", flush=True)
        print(f"{'dtype':>8} {'K':>6} {'N':>6} {'M':>5} {'base ms':>9} {'ours ms':>9} {'speedup':>8} "
              f"{'TFLOP/s':>8} {'GB/s':>7} {'roof%':>6} {'triton ms':>9} {'cuda ms':>9} {'cu/cuBLAS':>9} "
              f"{'cu/triton':>9}  backend", flush=True)
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
                row = gpu_row(env, roof, dev, dtype, M, weight, next_weight, next_dense)
                rows.append(row)
                write_csv(rows, csv_path)
            del dense, weight, next_dense, next_weight
    plotted = plot_speedup(rows, os.path.join(out_dir, f"int4_{dev.type}.png"), x="M", y="speedup",
                           series=("dtype", "K", "N"),
                           title=f"int4_mm speedup over dense F.linear, g{GROUP_SIZE} — {env['device']}")
    print(f"wrote {csv_path}" + (" and a plot" if plotted else ""))
    return rows


def gpu_row(env: dict, roof: dict, dev: torch.device, dtype: torch.dtype, M: int, weight, next_weight,
            next_dense) -> dict:
    """One GPU row (any device in the tests): M rows of x against the (rotating) int4 weight and its dense copy."""
    K, N = weight.in_features, weight.out_features
    x = torch.randn(M, K, device=dev, dtype=dtype)
    backend_name = tk.backends.select("int4_mm", x, weight.qweight, weight.scales, weight.offsets, GROUP_SIZE)[0]
    base = median_ms(lambda: F.linear(x, next_dense()), dev)
    ours = median_ms(lambda: tk.int4_linear(x, next_weight()), dev)
    forced = {name: optional_ms(lambda: tk.int4_linear(x, next_weight()), dev, lambda name=name: tk.backend(name),
                                first_calls=getattr(next_weight, "count", 1))
              for name in FORCED}
    triton_ms, cuda_ms = forced["triton"][0], forced["cuda"][0]
    flops = 2.0 * M * N * K
    n_bytes = weight.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
    row = dict(env, op="int4_mm", dtype=str(dtype).replace("torch.", ""), K=K, N=N, M=M,
               group_size=GROUP_SIZE, backend=backend_name, baseline="F.linear dense (cuBLAS)",
               baseline_ms=round(base, 5), ours_ms=round(ours, 5), speedup=round(base / ours, 3),
               tflops=round(flops / (ours * 1e-3) / 1e12, 3),
               gbps=round(n_bytes / (ours * 1e-3) / 1e9, 1),
               roofline_pct=round(100 * roofline_fraction(flops, n_bytes, ours, roof), 1),
               bandwidth_pct=round(100 * n_bytes / (ours * 1e-3) / roof["peak_bytes_per_s"], 1),
               matmul_peak_pct=round(100 * flops / (ours * 1e-3) / roof["peak_flops"], 1),
               triton_ms=rounded(triton_ms, 5), cuda_ms=rounded(cuda_ms, 5),
               triton_vs_cublas=ratio(base, triton_ms), cuda_vs_cublas=ratio(base, cuda_ms),
               cuda_vs_triton=ratio(triton_ms, cuda_ms),
               cuda_bandwidth_pct=ratio(100e3 * n_bytes / roof["peak_bytes_per_s"], cuda_ms, 1),
               triton_note=forced["triton"][1], cuda_note=forced["cuda"][1],
               peak_gbps=round(roof["peak_bytes_per_s"] / 1e9, 1),
               peak_tflops=round(roof["peak_flops"] / 1e12, 2))

    def cell(v, fmt=".4f", suffix=""):  # 9 characters; "-" for an empty cell
        return f"{'-':>9}" if v == "" else f"{v:>{9 - len(suffix)}{fmt}}{suffix}"

    print(f"{row['dtype']:>8} {K:>6} {N:>6} {M:>5} {base:>9.4f} {ours:>9.4f} {row['speedup']:>7.2f}x "
          f"{row['tflops']:>8.3f} {row['gbps']:>7.1f} {row['roofline_pct']:>6.1f} {cell(triton_ms)} {cell(cuda_ms)} "
          f"{cell(row['cuda_vs_cublas'], '.2f', 'x')} {cell(row['cuda_vs_triton'], '.2f', 'x')}  {backend_name}",
          flush=True)
    for name in FORCED:
        if forced[name][1]:
            print(f"    {name}: {forced[name][1]}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="one shape, a few M values")
    p.add_argument("--full", action="store_true", help="on CPU: all shapes and M values (slow)")
    p.add_argument("--m", default=None, help="on CPU: these M values instead, comma-separated (e.g. 1,64,256)")
    a = p.parse_args(argv)
    run(a.device, a.out, a.quick, a.full, [int(m) for m in a.m.split(",")] if a.m else None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

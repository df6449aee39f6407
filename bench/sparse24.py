"""2:4 sparse linear (op sparse24_mm) against dense matmul on real-model shapes.

GPU: ours (auto backend) vs cuBLAS `F.linear` in fp16 and bf16, and PyTorch's own 2:4 path,
`torch.sparse.to_sparse_semi_structured` (CUTLASS, and cuSPARSELt where this torch has it), all in the same run;
triton's do_bench medians. CPU: ours (C++ `cpu` backend) vs fp32 `F.linear` (MKL/oneDNN), medians, weights rotated
through enough copies to exceed the caches, as a model's layers do. speedup = dense time / that time.
TFLOP/s counts the dense-equivalent 2*M*N*K (comparable with the dense baseline). Roofline (bench/common.py):
bandwidth from a large copy, compute from a large dense matmul, both measured at the start; the compute term uses
the multiply-adds a 2:4 kernel executes (half of dense), at 2x the dense rate on GPU (sparse tensor cores) and 1x on
CPU. roofline_pct = the binding roof's share of the measured time.

GPU: also int4 + 2:4 (op sparse24_int4_mm, Sparse24Int4Weight g128) against the same dense F.linear and
against turbokernels' int4_linear (Int4Weight g128) on the same shapes and M (rows with op=sparse24_int4_mm).
CPU: per shape and M, dense fp32 and bf16 F.linear, sparse24 and sparse24_int4 (g128) are timed in turn, one call
each per round (common.interleaved_medians: a shared machine's bursts hit all four alike); speedup is against fp32
F.linear, speedup_vs_best_dense against the faster of fp32 and bf16; bandwidth_pct is the op's bytes per second
against the copy bandwidth measured at the start of the same run.

    python bench/sparse24.py [--device cpu|cuda] [--out DIR] [--quick]
    turbokernels bench sparse24 ...
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: python bench/sparse24.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels.bench.common import (copies_to_exceed_cache, environment, interleaved_medians,  # noqa: E402
                                       measured_roofline, median_ms, plot_speedup, rotating, write_csv)

# (in_features K, out_features N) of Llama-3-8B: attention / MLP up / MLP down
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]
GPU_M = [1, 16, 64, 256, 2048, 8192]
CPU_M = [1, 4, 16, 64, 256]


def _cases(device: torch.device, quick: bool):
    if device.type == "cuda":
        shapes, ms = (SHAPES[:1], [1, 16, 2048]) if quick else (SHAPES, GPU_M)
        return [(dt, shapes, ms) for dt in (torch.float16, torch.bfloat16)]
    return [(torch.float32, SHAPES[:1], [1, 16])] if quick else [(torch.float32, SHAPES, CPU_M)]


def _torch_semi_structured(dense: torch.Tensor) -> dict:
    """PyTorch's 2:4 weights of `dense`, per backend available here: {"cutlass": w, "cusparselt": w}."""
    out = {}
    try:
        from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    except ImportError:
        return out
    force = getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", None)
    wanted = [("cutlass", True)]
    if force is not None and getattr(torch.backends, "cusparselt", None) is not None and \
            torch.backends.cusparselt.is_available():
        wanted.append(("cusparselt", False))
    for name, cutlass in wanted:
        try:
            if force is not None:
                SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
            out[name] = to_sparse_semi_structured(dense)
        except Exception as exc:  # noqa: BLE001 - an unsupported dtype/shape/arch is a missing figure, not a crash
            print(f"# torch 2:4 {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        finally:
            if force is not None:
                SparseSemiStructuredTensor._FORCE_CUTLASS = force
    return out


def _time_or_nan(fn, dev, label: str) -> float:
    try:
        return median_ms(fn, dev)
    except Exception as exc:  # noqa: BLE001
        print(f"# {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", flush=True)
        return math.nan


def _int4_rows(dev, dtype, dense: torch.Tensor, m_values, env: dict) -> list[dict]:
    """int4 + 2:4 (sparse24_int4_linear, g128) vs dense F.linear and vs turbokernels int4_linear (g128)."""
    K, N = dense.shape[1], dense.shape[0]
    sw = tk.Sparse24Int4Weight.from_dense(dense, group_size=128)
    iw = tk.quantize_int4(dense, group_size=128)
    next_dense = rotating([dense] + [dense.clone() for _ in range(
        copies_to_exceed_cache(dense.numel() * dense.element_size(), dev) - 1)])
    next_sw = rotating([sw] + [tk.Sparse24Int4Weight(sw.qweight.clone(), sw.scales.clone(), sw.offsets.clone(),
                                                     sw.meta.clone(), sw.group_size, K)
                               for _ in range(copies_to_exceed_cache(sw.nbytes(), dev) - 1)])
    next_iw = rotating([iw] + [tk.Int4Weight(iw.qweight.clone(), iw.scales.clone(), iw.offsets.clone(), 128, K)
                               for _ in range(copies_to_exceed_cache(iw.nbytes(), dev) - 1)])
    rows = []
    for M in m_values:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        backend_name = tk.backends.select("sparse24_int4_mm", x, sw.qweight, sw.scales, sw.offsets, sw.meta,
                                          sw.kept_group_size)[0]
        base = median_ms(lambda: F.linear(x, next_dense()), dev)
        ours = median_ms(lambda: tk.sparse24_int4_linear(x, next_sw()), dev)
        int4 = median_ms(lambda: tk.int4_linear(x, next_iw()), dev)
        flops = 2.0 * M * N * K
        n_bytes = sw.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
        t = ours * 1e-3
        row = dict(env, op="sparse24_int4_mm", dtype=str(dtype).replace("torch.", ""), K=K, N=N, M=M,
                   backend=backend_name, baseline="F.linear dense", baseline_ms=round(base, 5),
                   ours_ms=round(ours, 5), speedup=round(base / ours, 3), int4_ms=round(int4, 5),
                   int4_speedup=round(base / int4, 3), speedup_vs_int4=round(int4 / ours, 3),
                   tflops=round(flops / t / 1e12, 3), gbps=round(n_bytes / t / 1e9, 1))
        rows.append(row)
        print(f"{row['dtype']:>8} {K:>6} {N:>6} {M:>5} {base:>9.4f} {ours:>9.4f} {row['speedup']:>7.2f}x "
              f"int4 {int4:>9.4f} ({row['int4_speedup']:.2f}x)  vs int4 {row['speedup_vs_int4']:.2f}x "
              f"{row['tflops']:>8.3f} {row['gbps']:>7.1f}  int4+2:4 {backend_name}", flush=True)
    return rows


def _cpu_rows(dev, dtype, dense: torch.Tensor, m_values, env: dict, roof: dict) -> list[dict]:
    """CPU: sparse24_mm and sparse24_int4_mm (g128) against dense fp32 and bf16 F.linear, interleaved medians."""
    K, N = dense.shape[1], dense.shape[0]
    sp = tk.Sparse24Weight.from_dense(dense)
    si = tk.Sparse24Int4Weight.from_dense(dense.float(), group_size=128)
    dense_bf16 = dense.bfloat16()

    def copies(first, n_bytes, clone):
        return rotating([first] + [clone(first) for _ in range(copies_to_exceed_cache(n_bytes, dev) - 1)])

    next_fp32 = copies(dense, dense.numel() * 4, torch.clone)
    next_bf16 = copies(dense_bf16, dense.numel() * 2, torch.clone)
    next_sp = copies(sp, sp.nbytes(), lambda w: tk.Sparse24Weight(w.values.clone(), w.meta.clone()))
    next_si = copies(si, si.nbytes(), lambda w: tk.Sparse24Int4Weight(w.qweight.clone(), w.scales.clone(),
                                                                      w.offsets.clone(), w.meta.clone(), 128, K))
    rows = []
    for M in m_values:
        x = torch.randn(M, K, device=dev, dtype=dtype)
        xb = x.bfloat16()
        ms = interleaved_medians({"fp32": lambda: F.linear(x, next_fp32()), "bf16": lambda: F.linear(xb, next_bf16()),
                                  "sparse24_mm": lambda: tk.sparse24_linear(x, next_sp()),
                                  "sparse24_int4_mm": lambda: tk.sparse24_int4_linear(x, next_si())})
        best_dense = min(ms["fp32"], ms["bf16"])
        for op, weight in (("sparse24_mm", sp), ("sparse24_int4_mm", si)):
            t = ms[op] * 1e-3
            flops = 2.0 * M * N * K
            n_bytes = weight.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
            roof_time = max(flops / 2 / roof["peak_flops"], n_bytes / roof["peak_bytes_per_s"])
            args = ((x, weight.values, weight.meta) if op == "sparse24_mm" else
                    (x, weight.qweight, weight.scales, weight.offsets, weight.meta, weight.kept_group_size))
            row = dict(env, op=op, dtype=str(dtype).replace("torch.", ""), K=K, N=N, M=M,
                       backend=tk.backends.select(op, *args)[0], baseline="F.linear dense",
                       baseline_ms=round(ms["fp32"], 5), ours_ms=round(ms[op], 5),
                       speedup=round(ms["fp32"] / ms[op], 3), bf16_baseline_ms=round(ms["bf16"], 5),
                       speedup_vs_best_dense=round(best_dense / ms[op], 3),
                       tflops=round(flops / t / 1e12, 3), gbps=round(n_bytes / t / 1e9, 1),
                       roofline_pct=round(100 * roof_time / t, 1),
                       bandwidth_pct=round(100 * n_bytes / t / roof["peak_bytes_per_s"], 1),
                       matmul_peak_pct=round(100 * flops / 2 / t / roof["peak_flops"], 1),
                       peak_gbps=round(roof["peak_bytes_per_s"] / 1e9, 1),
                       peak_tflops=round(roof["peak_flops"] / 1e12, 2), threads=torch.get_num_threads())
            rows.append(row)
            print(f"{row['dtype']:>8} {K:>6} {N:>6} {M:>5} {ms['fp32']:>9.4f} {ms['bf16']:>9.4f} {ms[op]:>9.4f} "
                  f"{row['speedup']:>7.2f}x {row['speedup_vs_best_dense']:>7.2f}x {row['gbps']:>7.1f} "
                  f"{row['bandwidth_pct']:>6.1f}  {op} {row['backend']}", flush=True)
    return rows


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False) -> list[dict]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    env = environment(dev)
    sparse_rate = 2.0 if dev.type == "cuda" else 1.0
    rows = []
    for dtype, shapes, m_values in _cases(dev, quick):
        roof = measured_roofline(dev, dtype)
        print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}  "
              f"measured peak {roof['peak_bytes_per_s'] / 1e9:.0f} GB/s, {roof['peak_flops'] / 1e12:.2f} "
              f"TFLOP/s ({dtype})", flush=True)
        if dev.type == "cpu":
            print(f"{'dtype':>8} {'K':>6} {'N':>6} {'M':>5} {'fp32 ms':>9} {'bf16 ms':>9} {'ours ms':>9} "
                  f"{'vs fp32':>8} {'vs best':>8} {'GB/s':>7} {'bw%':>6}  op backend", flush=True)
            for K, N in shapes:
                rows += _cpu_rows(dev, dtype, tk.prune_24(torch.randn(N, K, device=dev) * 0.02).to(dtype), m_values,
                                  env, roof)
            continue
        print(f"{'dtype':>8} {'K':>6} {'N':>6} {'M':>5} {'dense ms':>9} {'ours ms':>9} {'speedup':>8} "
              f"{'cutlass':>8} {'cuspLt':>8} {'TFLOP/s':>8} {'GB/s':>7} {'roof%':>6}  backend", flush=True)
        for K, N in shapes:
            dense = tk.prune_24(torch.randn(N, K, device=dev) * 0.02).to(dtype)
            weight = tk.Sparse24Weight.from_dense(dense)
            # several copies of each weight, used in turn (see common.rotating)
            next_dense = rotating([dense] + [dense.clone() for _ in range(
                copies_to_exceed_cache(dense.numel() * dense.element_size(), dev) - 1)])
            next_weight = rotating([weight] + [tk.Sparse24Weight(weight.values.clone(), weight.meta.clone())
                                               for _ in range(copies_to_exceed_cache(weight.nbytes(), dev) - 1)])
            theirs = _torch_semi_structured(dense) if dev.type == "cuda" else {}
            for M in m_values:
                x = torch.randn(M, K, device=dev, dtype=dtype)
                backend_name = tk.backends.select("sparse24_mm", x, weight.values, weight.meta)[0]
                base = median_ms(lambda: F.linear(x, next_dense()), dev)
                ours = median_ms(lambda: tk.sparse24_linear(x, next_weight()), dev)
                other = {name: _time_or_nan(lambda w=w: F.linear(x, w), dev, f"torch 2:4 {name} M={M}")
                         for name, w in theirs.items()}
                flops = 2.0 * M * N * K
                n_bytes = weight.nbytes() + x.numel() * x.element_size() + M * N * x.element_size()
                t = ours * 1e-3
                roof_time = max(flops / 2 / (roof["peak_flops"] * sparse_rate), n_bytes / roof["peak_bytes_per_s"])
                row = dict(env, op="sparse24_mm", dtype=str(dtype).replace("torch.", ""), K=K, N=N, M=M,
                           backend=backend_name, baseline="F.linear dense",
                           baseline_ms=round(base, 5), ours_ms=round(ours, 5), speedup=round(base / ours, 3),
                           tflops=round(flops / t / 1e12, 3), gbps=round(n_bytes / t / 1e9, 1),
                           roofline_pct=round(100 * roof_time / t, 1),
                           bandwidth_pct=round(100 * n_bytes / t / roof["peak_bytes_per_s"], 1),
                           matmul_peak_pct=round(100 * flops / 2 / t / (roof["peak_flops"] * sparse_rate), 1),
                           peak_gbps=round(roof["peak_bytes_per_s"] / 1e9, 1),
                           peak_tflops=round(roof["peak_flops"] / 1e12, 2))
                for name in ("cutlass", "cusparselt"):
                    ms = other.get(name, math.nan)
                    row[f"torch_{name}_ms"] = round(ms, 5)
                    row[f"torch_{name}_speedup"] = round(base / ms, 3) if ms == ms else math.nan
                rows.append(row)
                print(f"{row['dtype']:>8} {K:>6} {N:>6} {M:>5} {base:>9.4f} {ours:>9.4f} {row['speedup']:>7.2f}x "
                      f"{row['torch_cutlass_speedup']:>7.2f}x {row['torch_cusparselt_speedup']:>7.2f}x "
                      f"{row['tflops']:>8.3f} {row['gbps']:>7.1f} {row['roofline_pct']:>6.1f}  {backend_name}",
                      flush=True)
            # int4 + 2:4 rows: the Triton kernel needs a GPU to be timed; --quick times fp16 only (gpu_check budget)
            if dev.type == "cuda" and (not quick or dtype == torch.float16):
                rows += _int4_rows(dev, dtype, dense, m_values, env)
            del dense, weight, next_dense, next_weight, theirs
    tag = dev.type
    csv_path = os.path.join(out_dir, f"sparse24_{tag}.csv")
    write_csv(rows, csv_path)
    # one line per (implementation, dtype, shape): ours and, on GPU, PyTorch's 2:4 backends
    plot_rows = []
    for r in rows:
        impls = ((("ours int4+2:4", "speedup"),) if r["op"] == "sparse24_int4_mm" and "int4_speedup" not in r else
                 (("ours int4+2:4", "speedup"), ("turbokernels int4", "int4_speedup"))
                 if r["op"] == "sparse24_int4_mm" else
                 (("ours", "speedup"), ("torch cutlass", "torch_cutlass_speedup"),
                  ("torch cusparselt", "torch_cusparselt_speedup")))
        for impl, key in impls:
            if r.get(key, math.nan) == r.get(key, math.nan):
                plot_rows.append(dict(r, impl=impl, speedup_vs_dense=r[key]))
    plotted = plot_speedup(plot_rows, os.path.join(out_dir, f"sparse24_{tag}.png"), x="M",
                           y="speedup_vs_dense", series=("impl", "dtype", "K", "N"),
                           title=f"2:4 sparse linear: speedup over dense F.linear — {env['device']}")
    print(f"wrote {csv_path}" + (" and a plot" if plotted else ""))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="one shape, few M values")
    a = p.parse_args(argv)
    run(a.device, a.out, a.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

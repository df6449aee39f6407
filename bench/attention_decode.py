"""KV-cache decode attention (op decode_attention) against F.scaled_dot_product_attention on Llama-3-8B heads.

GPU: ours (the automatic backend: Triton, flash-decoding, until a CUDA C++ kernel is verified on the GPU's
architecture, python/turbokernels/acceptance.py) on contiguous and paged caches vs torch's SDPA (its best backend
for the shape, GQA through enable_gqa) on the same keys laid out as it prefers, (B, Hkv, S, D) contiguous. Every
sequence is full (cache_seqlens = capacity), so SDPA needs no mask and both read the same bytes. Medians (triton's
do_bench, which flushes L2; the caches are larger than L2 anyway). gbps = bytes read and written (K, V, q, out)
per second; bandwidth_pct = that over a large copy's rate measured at the start of the run (decode is
bandwidth-bound). Besides, per row: our `triton` and `cuda` backends forced (`with tk.backend(name)`: triton_ms,
cuda_ms) and SDPA with one backend imposed (`sdpa_kernel(SDPBackend.FLASH_ATTENTION / CUDNN_ATTENTION)`:
sdpa_flash_ms, sdpa_cudnn_ms). A contender that cannot run the case (no `cuda` backend for the op yet, a _C without
the kernel, an SDPA backend that refuses GQA or the explicit mask of several new tokens) leaves an empty cell and
says why in `notes`. Ratios (> 1: the first named is faster): cuda_vs_triton, cuda_vs_flash, cuda_vs_cudnn,
triton_vs_flash, triton_vs_cudnn. The CSV is rewritten after every shape, so a run stopped by a timeout keeps its
rows.

CPU (--device cpu): ours (the automatic backend, `cpu`: csrc/cpu/decode_attention.cpp, K/V read once per kv head
from the cache as it is) against F.scaled_dot_product_attention(enable_gqa=True) on the
SAME keys in two layouts, timed in turns (interleaved medians: the CPU may be shared), fp32 and bf16: sdpa_cache_ms
is SDPA given our cache as a user of SDPA with this cache would pass it, a (B, Hkv, S, D) transpose view of the
(B, S, Hkv, D) tensor (no copy); sdpa_contig_ms is SDPA given a (B, Hkv, S, D) contiguous copy, its preferred layout
(the copy made beforehand, not timed: a cache kept in that layout). speedup_cache / speedup_contig = that SDPA
time / ours. One new token over full caches; with lengths that differ per sequence (between S/2 and S) and with 4
new tokens, SDPA gets the equivalent explicit mask, built beforehand (not timed).

    python bench/attention_decode.py [--device cpu|cuda] [--out DIR] [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: python bench/attention_decode.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels.bench.common import (cpu_environment, environment, interleaved_medians, measured_roofline,  # noqa: E402
                                       median_ms, optional_ms, plot_speedup, ratio, rounded, write_csv)

HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128   # Llama-3-8B
PAGE_SIZE = 64
# Our backends timed on GPU besides the automatic choice, each forced.
FORCED = ("triton", "cuda")
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION"}


def _cases(device: torch.device, quick: bool):
    if quick:
        return [(torch.bfloat16, [(1, 4096), (16, 4096)], 1)]
    shapes = [(b, s) for b in (1, 4, 16, 64) for s in (1024, 4096, 16384) if b * s <= 64 * 16384]
    return [(dt, shapes + [(1, 65536), (4, 32768)], t) for dt in (torch.bfloat16, torch.float16) for t in (1, 4)]


def _paged(k: torch.Tensor, v: torch.Tensor):
    """The same keys in a paged cache with a shuffled block table."""
    B, S, H, D = k.shape
    pages = S // PAGE_SIZE
    perm = torch.randperm(B * pages, device=k.device)
    table = perm.view(B, pages).to(torch.int32)
    kp = torch.empty(B * pages, PAGE_SIZE, H, D, device=k.device, dtype=k.dtype)
    vp = torch.empty_like(kp)
    kp[perm] = k.reshape(B * pages, PAGE_SIZE, H, D)
    vp[perm] = v.reshape(B * pages, PAGE_SIZE, H, D)
    return kp, vp, table


def _cpu_rows(quick: bool) -> list[dict]:
    env = cpu_environment()
    print(f"# {env['device']}, torch {env['torch']}, {env['date']}: decode_attention (auto backend) vs "
          f"F.scaled_dot_product_attention, heads {HEADS_Q}/{HEADS_KV} d{HEAD_DIM}, interleaved medians", flush=True)
    shapes = [(1, 512), (4, 2048)] if quick else [(1, 512), (1, 2048), (1, 8192), (8, 512), (8, 2048)]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for B, S in shapes:
            g = torch.Generator().manual_seed(B * S)
            k, v = (torch.randn(B, S, HEADS_KV, HEAD_DIM, generator=g).to(dtype) for _ in range(2))
            kv, vv = k.transpose(1, 2), v.transpose(1, 2)  # our cache as SDPA takes it: views, no copy
            kt, vt = kv.contiguous(), vv.contiguous()  # SDPA's preferred layout (a copy, not timed)
            for case in ("full", "ragged", "new_tokens4"):
                T = 4 if case == "new_tokens4" else 1
                q = torch.randn(B, T, HEADS_Q, HEAD_DIM, generator=g).to(dtype)
                qt = q.transpose(1, 2)
                if case == "ragged":
                    lens = torch.randint(S // 2, S + 1, (B,), generator=g, dtype=torch.int32)
                else:
                    lens = torch.full((B,), S, dtype=torch.int32)
                mask = None
                if case != "full":  # key j allowed iff j <= L_b - T + t
                    j = torch.arange(S)
                    last = lens.view(B, 1, 1, 1).long() - T + torch.arange(T).view(1, 1, T, 1)
                    mask = torch.zeros(B, 1, T, S, dtype=dtype).masked_fill(j > last, float("-inf"))
                ms = interleaved_medians({
                    "ours": lambda: tk.decode_attention(q, k, v, lens),
                    "sdpa_cache": lambda: F.scaled_dot_product_attention(qt, kv, vv, attn_mask=mask, enable_gqa=True),
                    "sdpa_contig": lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask,
                                                                          enable_gqa=True),
                }, min_time_s=0.3 if quick else 1.0)
                row = dict(env, op="decode_attention", case=case, dtype=str(dtype).replace("torch.", ""), batch=B,
                           seqlen=S, new_tokens=T, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM,
                           ours_ms=round(ms["ours"], 4), sdpa_cache_ms=round(ms["sdpa_cache"], 4),
                           sdpa_contig_ms=round(ms["sdpa_contig"], 4),
                           speedup_cache=round(ms["sdpa_cache"] / ms["ours"], 3),
                           speedup_contig=round(ms["sdpa_contig"] / ms["ours"], 3))
                rows.append(row)
                print(f"{row['dtype']:<8} B={B:<2} S={S:<5} {case:<12} ours {ms['ours']:8.3f} ms  sdpa(cache view) "
                      f"{ms['sdpa_cache']:8.3f} ms {row['speedup_cache']:.2f}x  sdpa(contig copy) "
                      f"{ms['sdpa_contig']:8.3f} ms {row['speedup_contig']:.2f}x", flush=True)
    return rows


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False) -> list[dict]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if dev.type == "cpu":
        rows = _cpu_rows(quick)
        write_csv(rows, os.path.join(out_dir, "attention_decode_cpu.csv"))
        print(f"wrote {out_dir}/attention_decode_cpu.csv")
        return rows
    return run_gpu(dev, out_dir, quick)


def run_gpu(dev: torch.device, out_dir: str, quick: bool) -> list[dict]:
    """The GPU table (the `_cases` grid, every case by gpu_rows), its CSV after every case and the plot."""
    env = environment(dev)
    rows = []
    csv_path = os.path.join(out_dir, f"attention_decode_{dev.type}.csv")
    for dtype, shapes, T in _cases(dev, quick):
        roof = measured_roofline(dev, dtype)
        print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}  "
              f"measured copy {roof['peak_bytes_per_s'] / 1e9:.0f} GB/s; heads {HEADS_Q}/{HEADS_KV} d{HEAD_DIM} "
              f"{dtype} new_tokens={T}", flush=True)
        print(f"{'B':>4} {'S':>6} {'layout':>7} {'sdpa ms':>9} {'ours ms':>9} {'speedup':>8} {'GB/s':>7} "
              f"{'bw%':>6} {'triton ms':>9} {'cuda ms':>9} {'flash ms':>9} {'cudnn ms':>9} {'cu/triton':>9}  backend",
              flush=True)
        for B, S in shapes:
            rows += gpu_rows(env, roof, dev, dtype, B, S, T)
            write_csv(rows, csv_path)
    plotted = plot_speedup(rows, os.path.join(out_dir, f"attention_decode_{dev.type}.png"), x="seqlen",
                           y="bandwidth_pct", series=("dtype", "batch", "new_tokens", "layout"),
                           title=f"decode_attention, % of copy bandwidth — {env['device']}")
    print(f"wrote {csv_path}" + (" and a plot" if plotted else ""))
    return rows


def _sdpa_backend(name: str):
    """A context imposing one SDPA backend, or None where this torch lacks it."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return None
    backend = getattr(SDPBackend, SDPA_BACKENDS[name], None)
    return None if backend is None else (lambda: sdpa_kernel(backend))


def gpu_rows(env: dict, roof: dict, dev: torch.device, dtype: torch.dtype, B: int, S: int, T: int) -> list[dict]:
    """The rows of one (batch, seqlen, new tokens) case, contiguous and (S a multiple of PAGE_SIZE) paged cache
    (any device in the tests)."""
    k = torch.randn(B, S, HEADS_KV, HEAD_DIM, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    q = torch.randn(B, T, HEADS_Q, HEAD_DIM, device=dev, dtype=dtype)
    lens = torch.full((B,), S, dtype=torch.int32, device=dev)
    kt, vt, qt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), q.transpose(1, 2)
    # causal among the T new tokens, aligned to the end: an explicit mask for T > 1
    mask = None
    if T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=dev).tril(S - T)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=True)

    base = median_ms(sdpa, dev)
    imposed = {}
    for name in SDPA_BACKENDS:
        context = _sdpa_backend(name)
        imposed[name] = optional_ms(sdpa, dev, context) if context else ("", "not in this torch")
    n_bytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
    layouts = [("contig", k, v, None)]
    if S % PAGE_SIZE == 0:
        layouts.append(("paged", *_paged(k, v)))
    rows = []
    for layout, kc, vc, table in layouts:
        backend_name = tk.backends.select("decode_attention", q, kc, vc, lens, table, None, 0.0, -1, -1,
                                          0.0, None, None, True, False)[0]

        def ours():
            return tk.decode_attention(q, kc, vc, lens, block_table=table)

        ours_ms = median_ms(ours, dev)
        forced = {name: optional_ms(ours, dev, lambda name=name: tk.backend(name)) for name in FORCED}
        triton_ms, cuda_ms = forced["triton"][0], forced["cuda"][0]
        flash_ms, cudnn_ms = imposed["flash"][0], imposed["cudnn"][0]
        gbps = n_bytes / (ours_ms * 1e-3) / 1e9
        notes = "; ".join(f"{name}: {why}" for name, (_, why) in [*forced.items(), *(
            (f"sdpa_{n}", r) for n, r in imposed.items())] if why)
        row = dict(env, op="decode_attention", dtype=str(dtype).replace("torch.", ""), batch=B, seqlen=S,
                   new_tokens=T, heads_q=HEADS_Q, heads_kv=HEADS_KV, head_dim=HEAD_DIM, layout=layout,
                   backend=backend_name, baseline="F.scaled_dot_product_attention",
                   baseline_ms=round(base, 5), ours_ms=round(ours_ms, 5), speedup=round(base / ours_ms, 3),
                   gbps=round(gbps, 1),
                   bandwidth_pct=round(100 * gbps * 1e9 / roof["peak_bytes_per_s"], 1),
                   triton_ms=rounded(triton_ms, 5), cuda_ms=rounded(cuda_ms, 5),
                   sdpa_flash_ms=rounded(flash_ms, 5), sdpa_cudnn_ms=rounded(cudnn_ms, 5),
                   cuda_vs_triton=ratio(triton_ms, cuda_ms), cuda_vs_flash=ratio(flash_ms, cuda_ms),
                   cuda_vs_cudnn=ratio(cudnn_ms, cuda_ms), triton_vs_flash=ratio(flash_ms, triton_ms),
                   triton_vs_cudnn=ratio(cudnn_ms, triton_ms),
                   cuda_bandwidth_pct=ratio(100e3 * n_bytes / roof["peak_bytes_per_s"], cuda_ms, 1),
                   notes=notes, peak_gbps=round(roof["peak_bytes_per_s"] / 1e9, 1))
        rows.append(row)

        def cell(value, fmt=".4f", suffix=""):  # 9 characters; "-" for an empty cell
            return f"{'-':>9}" if value == "" else f"{value:>{9 - len(suffix)}{fmt}}{suffix}"

        print(f"{B:>4} {S:>6} {layout:>7} {base:>9.4f} {ours_ms:>9.4f} {row['speedup']:>7.2f}x {gbps:>7.1f} "
              f"{row['bandwidth_pct']:>6.1f} {cell(triton_ms)} {cell(cuda_ms)} {cell(flash_ms)} {cell(cudnn_ms)} "
              f"{cell(row['cuda_vs_triton'], '.2f', 'x')}  {backend_name}", flush=True)
        if notes:
            print(f"    {notes}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--threads", type=int, default=0, help="CPU: torch.set_num_threads (0: torch's default)")
    p.add_argument("--quick", action="store_true", help="two shapes, bf16, one new token")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.device, a.out, a.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

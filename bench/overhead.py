"""Per-call overhead: every turbokernels module and functional on tiny shapes against torch's equivalent.

At tiny shapes (one token, 64 features) the kernels do almost nothing, so what is measured is what each layer of
the call path adds: the module, the functional entry (argument checks), the torch.ops.turbokernels op (the
dispatcher, autograd registration, backends.dispatch), the chosen backend's function, and the C++ kernel alone
(torch.ops.turbokernels_C.*). Each row is one entry at one layer; `ratio` = its time / the torch equivalent's
(`baseline`: nn.Linear for the modules, F.linear for the functionals and the layers below them,
F.scaled_dot_product_attention for the attention entries, nn.MultiheadAttention for MultiheadAttention), all
measured in the same run.

Timing: every callable runs in turn, `inner` calls per turn, over many turns (interleaved: a noisy neighbour slows
all of them alike); the figure is the median over turns of the mean time per call, in microseconds.
CPU: wall time per call on one thread (torch.set_num_threads(1), so the figure is the Python/dispatch cost and not
the thread pool's). CUDA: a turn is `inner` back-to-back calls between two torch.cuda.synchronize(), so the
figure is the per-call time a decode loop sees: max(host-side launch cost, GPU time), and at these shapes the host
side is what binds.

    python bench/overhead.py [--device cpu|cuda] [--out DIR] [--quick] [--threads N]
    turbokernels bench overhead ...
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as a script: python bench/overhead.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels import backends  # noqa: E402
from turbokernels.bench.common import environment, write_csv  # noqa: E402

# tiny: one token, 64 features (a multiple of the 2:4 and int4 packing units), group 32
M, K, N, GROUP = 1, 64, 64, 32
B, L, H, D = 1, 4, 2, 32  # attention: batch, tokens, heads, head_dim
CACHE = 64  # decode: cache length (16 valid)


def interleaved_us(fns: dict[object, Callable[[], object]], device: torch.device, rounds: int, inner: int,
                   warmup: int = 20) -> dict[object, float]:
    """Median over `rounds` turns of the mean per-call time (us) of each fn, the fns run in turn (interleaved)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync()
    times: dict[object, list[float]] = {k: [] for k in fns}
    clock = time.perf_counter_ns
    for _ in range(rounds):
        for name, fn in fns.items():
            sync()
            t0 = clock()
            for _ in range(inner):
                fn()
            sync()
            times[name].append((clock() - t0) / inner / 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _kernel_alone(op: str, args: tuple) -> tuple[str, Optional[Callable[[], object]], Optional[Callable]]:
    """(backend name, the backend's function, the C++ kernel when that backend is one) for these op arguments."""
    name, impl = backends.select(op, *args)
    c_op = getattr(torch.ops.turbokernels_C, op) if name in ("cpu", "cuda") else None
    return name, impl.fn, c_op


def _linear_cases(dev: torch.device, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    lin = nn.Linear(K, N, device=dev, dtype=dtype)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    mods = {
        "Int4Linear": (tk.nn.Int4Linear.from_linear(lin, group_size=GROUP), tk.int4_linear, "int4_mm"),
        "Sparse24Linear": (tk.nn.Sparse24Linear.from_linear(lin), tk.sparse24_linear, "sparse24_mm"),
        "Sparse24Int4Linear": (tk.nn.Sparse24Int4Linear.from_linear(lin, group_size=GROUP),
                               tk.sparse24_int4_linear, "sparse24_int4_mm"),
        "W4A8Linear": (tk.nn.W4A8Linear.from_linear(lin, group_size=GROUP), tk.w4a8_linear, "w4a8_mm"),
    }
    cases = [dict(family="linear", entry="nn.Linear", layer="module", baseline="nn.Linear", fn=lambda: lin(x)),
             dict(family="linear", entry="F.linear", layer="functional", baseline="F.linear",
                  fn=lambda: F.linear(x, lin.weight, lin.bias))]
    for mod_name, (mod, functional, op) in mods.items():
        w, b = mod.weight, mod.bias.to(dtype)
        if op in ("int4_mm", "w4a8_mm"):
            args = (x, w.qweight, w.scales, w.offsets, w.effective_group_size, b)
        elif op == "sparse24_mm":
            args = (x, w.values, w.meta, b)
        else:
            args = (x, w.qweight, w.scales, w.offsets, w.meta, w.kept_group_size, b)
        backend_name, backend_fn, c_op = _kernel_alone(op, args)
        packet = getattr(torch.ops.turbokernels, op)
        fam = dict(family=op, backend=backend_name)
        cases += [
            dict(fam, entry=mod_name, layer="module", baseline="nn.Linear", fn=lambda mod=mod: mod(x)),
            dict(fam, entry=functional.__name__, layer="functional", baseline="F.linear",
                 fn=lambda f=functional, w=w, b=b: f(x, w, b)),
            dict(fam, entry=f"torch.ops.turbokernels.{op}", layer="op", baseline="F.linear",
                 fn=lambda p=packet, a=args: p(*a)),
            dict(fam, entry=f"backend {backend_name}", layer="backend", baseline="F.linear",
                 fn=lambda f=backend_fn, a=args: f(*a)),
        ]
        if c_op is not None:
            cases.append(dict(fam, entry=f"torch.ops.turbokernels_C.{op}", layer="kernel", baseline="F.linear",
                              fn=lambda f=c_op, a=args: f(*a)))
    return cases


def _attention_cases(dev: torch.device, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device=dev, dtype=dtype) for _ in range(3))  # FlashAttention's layout
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA's (B, H, L, D)
    scale = D ** -0.5
    fwd_args = (q, k, v, None, None, None, scale, True, -1, -1, 0.0)
    cases = [dict(family="attention", entry="F.scaled_dot_product_attention", layer="functional",
                  baseline="F.scaled_dot_product_attention",
                  fn=lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True))]
    try:
        name, impl = backends.select("attention_fwd", *fwd_args)
        below = [dict(family="attention", entry="torch.ops.turbokernels.attention_fwd", layer="op", backend=name,
                      baseline="F.scaled_dot_product_attention",
                      fn=lambda: torch.ops.turbokernels.attention_fwd(*fwd_args)),
                 dict(family="attention", entry=f"backend {name}", layer="backend", backend=name,
                      baseline="F.scaled_dot_product_attention", fn=lambda: impl.fn(*fwd_args))]
    except (RuntimeError, TypeError) as exc:  # the op's schema changed under this benchmark: measure the entries
        print(f"# attention_fwd layers not measured: {exc}")
        below = []
    cases += [
        dict(family="attention", entry="attention", layer="functional", baseline="F.scaled_dot_product_attention",
             fn=lambda: tk.attention(q, k, v, causal=True)),
        dict(family="attention", entry="scaled_dot_product_attention", layer="functional",
             baseline="F.scaled_dot_product_attention",
             fn=lambda: tk.scaled_dot_product_attention(qt, kt, vt, is_causal=True)),
    ] + below

    # decode: one new token over a cache of CACHE slots, 16 valid; torch's equivalent reads the valid prefix
    qd = torch.randn(B, 1, H, D, device=dev, dtype=dtype)
    kc, vc = (torch.randn(B, CACHE, H, D, device=dev, dtype=dtype) for _ in range(2))
    seqlens = torch.full((B,), 16, dtype=torch.int32, device=dev)
    qdt, kvt, vvt = qd.transpose(1, 2), kc[:, :16].transpose(1, 2), vc[:, :16].transpose(1, 2)
    cases += [
        dict(family="decode_attention", entry="F.scaled_dot_product_attention (decode)", layer="functional",
             baseline="F.scaled_dot_product_attention (decode)",
             fn=lambda: F.scaled_dot_product_attention(qdt, kvt, vvt)),
        dict(family="decode_attention", entry="decode_attention", layer="functional",
             baseline="F.scaled_dot_product_attention (decode)",
             fn=lambda: tk.decode_attention(qd, kc, vc, seqlens)),
    ]

    mha_t = nn.MultiheadAttention(H * D, H, batch_first=True, device=dev, dtype=dtype)
    mha = tk.nn.MultiheadAttention.from_module(mha_t)
    xm = torch.randn(B, L, H * D, device=dev, dtype=dtype)
    cases += [
        dict(family="MultiheadAttention", entry="nn.MultiheadAttention", layer="module",
             baseline="nn.MultiheadAttention", fn=lambda: mha_t(xm, xm, xm, need_weights=False)),
        dict(family="MultiheadAttention", entry="MultiheadAttention", layer="module",
             baseline="nn.MultiheadAttention", fn=lambda: mha(xm, xm, xm, need_weights=False)),
    ]
    return cases


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False,
        threads: Optional[int] = 1) -> list[dict]:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if threads:
        torch.set_num_threads(threads)
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    rounds, inner = (30, 20) if quick else (200, 25)
    env = environment(dev)
    with torch.no_grad():  # inference: what a served model calls (the autograd path is measured by no one here)
        cases = _linear_cases(dev, dtype) + _attention_cases(dev, dtype)
        timed = interleaved_us({i: c["fn"] for i, c in enumerate(cases)}, dev, rounds, inner)
    us = [timed[i] for i in range(len(cases))]
    base = {c["entry"]: t for c, t in zip(cases, us) if c["entry"] == c["baseline"]}
    print(f"# {env['device']}  torch {env['torch']}  triton {env['triton']}  {env['date']}  "
          f"{torch.get_num_threads()} thread(s)  {str(dtype).replace('torch.', '')}  medians of {rounds} interleaved "
          f"turns x {inner} calls", flush=True)
    print(f"{'family':<18} {'layer':<10} {'entry':<40} {'us':>9} {'ratio':>7}  baseline (backend)")
    rows = []
    for c, t in zip(cases, us):
        bt = base[c["baseline"]]
        row = dict(env, threads=torch.get_num_threads(), dtype=str(dtype).replace("torch.", ""),
                   family=c["family"], layer=c["layer"], entry=c["entry"], backend=c.get("backend", ""),
                   us=round(t, 2), baseline=c["baseline"], baseline_us=round(bt, 2), ratio=round(t / bt, 3),
                   rounds=rounds, inner=inner)
        rows.append(row)
        print(f"{c['family']:<18} {c['layer']:<10} {c['entry']:<40} {t:>9.2f} {t / bt:>6.2f}x  {c['baseline']}"
              + (f" ({row['backend']})" if row["backend"] else ""), flush=True)
    csv_path = os.path.join(out_dir, f"overhead_{dev.type}.csv")
    write_csv(rows, csv_path)
    print(f"wrote {csv_path}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="fewer turns (a smoke run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1; 0: leave torch's default)")
    a = p.parse_args(argv)
    run(a.device, a.out, a.quick, a.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What tensor parallelism costs a packed layer per call, beyond its kernel: a column-parallel Int4Linear followed by
a row-parallel one (an MLP's up and down projections, one decode row), in turbokernels.parallel's two paths:

  local   the styles' default layouts (what tp_plan gives): plain tensors in and out, one all_reduce per pair
  dtensor the same split under layouts that need torch's hooks (use_local_output=False): DTensors in and out,
          torch's redistribute for the reduction
against the unsharded pair on each rank, a bare all_reduce of the output row (the communication alone) and the
peer: torch's own ColwiseParallel / RowwiseParallel on the dense nn.Linear pair (torch_dense; fp32 on CPU, fp16 on
GPUs, so its kernel time differs from int4's: compare the overheads, not the totals).
Every rank times the same calls in the same order (interleaved rounds, a fixed count: the collectives need all
ranks); rank 0's medians are reported, with the ranks' processes on this machine (gloo on CPU, NCCL on GPUs).

    python bench/parallel.py [--world 1 2] [--sizes 256x512 2048x5632] [--out bench/out]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def ranks(rank: int, world: int, sizes: list, rounds: int, device: str) -> list:
    """The worker: every rank builds the same layers (one seed) and times them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    import turbokernels as tk
    from turbokernels.bench.common import environment, interleaved_medians
    P = tk.parallel
    if device == "cuda":
        torch.cuda.set_device(rank)
    mesh = init_device_mesh(device, (world,))
    rows = []
    for hidden, inner in sizes:
        def pair():
            torch.manual_seed(0)
            seq = torch.nn.Sequential(torch.nn.Linear(hidden, inner, bias=False),
                                      torch.nn.Linear(inner, hidden, bias=False)).to(device)
            tk.optimize(seq, attention=False, int4=True, group_size=128, progress=False)
            return seq
        plain, local, dtensor = pair(), pair(), pair()
        torch.manual_seed(0)  # the peer: torch's own styles on the dense nn.Linear pair (DTensor per call)
        dense = torch.nn.Sequential(torch.nn.Linear(hidden, inner, bias=False),
                                    torch.nn.Linear(inner, hidden, bias=False)).to(device)
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
        parallelize_module(dense, mesh, {"0": ColwiseParallel(), "1": RowwiseParallel()})
        parallelize_module(local, mesh, {"0": P.ColwiseParallel(), "1": P.RowwiseParallel()})
        parallelize_module(dtensor, mesh, {"0": P.ColwiseParallel(use_local_output=False),
                                           "1": P.RowwiseParallel(use_local_output=False)})
        x = torch.randn(1, hidden, device=device, dtype=torch.float16 if device == "cuda" else torch.float32)
        plain, local, dtensor, dense = (m.to(x.dtype) for m in (plain, local, dtensor, dense))
        row = torch.zeros(1, hidden, device=device, dtype=x.dtype)
        group = mesh.get_group()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

        def timed(fn):
            def run():
                fn()
                sync()
            return run

        with torch.no_grad():
            out = dtensor(x)
            assert isinstance(out, DTensor) and torch.allclose(out.to_local(), local(x), rtol=1e-3, atol=1e-3)
            ms = interleaved_medians({
                "unsharded": timed(lambda: plain(x)),
                "local": timed(lambda: local(x)),
                "dtensor": timed(lambda: dtensor(x).to_local().clone()),  # clone: waits for the reduction
                "torch_dense": timed(lambda: dense(x)),
                "all_reduce": timed(lambda: dist.all_reduce(row, group=group)),
            }, warmup=5, rounds=rounds, min_time_s=0.0)
        env = environment(torch.device(device))
        rows.append(dict(world=world, hidden=hidden, inner=inner, **{f"{k}_us": round(v * 1e3, 1)
                                                                     for k, v in ms.items()},
                         local_overhead_us=round((ms["local"] - ms["unsharded"] / world) * 1e3, 1),
                         dtensor_minus_local_us=round((ms["dtensor"] - ms["local"]) * 1e3, 1),
                         backend=dist.get_backend(), **env))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sizes", nargs="+", default=["256x512", "2048x5632"], help="hidden x intermediate")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--out", default="bench/out")
    args = ap.parse_args(argv)
    from turbokernels.bench.common import write_csv
    from turbokernels.testing_parallel import run_ranks
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    rows = []
    for world in args.world:
        if device == "cuda" and world > torch.cuda.device_count():
            print(f"world {world}: skipped, {torch.cuda.device_count()} GPU(s)")
            continue
        with tempfile.TemporaryDirectory() as folder:
            rows += run_ranks("turbokernels.bench.parallel:ranks", folder, world=world,
                              backend="nccl" if device == "cuda" else "gloo", timeout=600, sizes=sizes,
                              rounds=args.rounds, device=device)[0]
    print(f"{rows[0]['device']}, torch {rows[0]['torch']}, {rows[0]['backend']}, median us per call (rank 0)")
    print("world  hidden x inner  unsharded   local  dtensor  torch dense  all_reduce  local overhead  "
          "dtensor - local")
    for r in rows:
        print(f"{r['world']:5d}  {r['hidden']:6d} x {r['inner']:5d}  {r['unsharded_us']:9.1f}  {r['local_us']:6.1f}  "
              f"{r['dtensor_us']:7.1f}  {r['torch_dense_us']:11.1f}  {r['all_reduce_us']:10.1f}  "
              f"{r['local_overhead_us']:14.1f}  {r['dtensor_minus_local_us']:15.1f}")
    path = os.path.join(args.out, "parallel.csv")
    write_csv(rows, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    main()

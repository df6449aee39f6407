"""Where int4 + tensor parallelism pays, on paper (docs/scaling.md): weight bytes per rank, HBM time per decoded
token, all-reduce bytes and time per token at TP = 1/2/4/8, for Llama-3 8B and 70B (and 405B for the "needs TP even
at int4" question). Batch-1 decode is memory-bound: a token's time is the bytes each rank streams (its weight shard,
the lm_head shard, its share of the KV cache) over HBM bandwidth, plus the all-reduces Megatron's column/row split
needs (two per layer, of one hidden-size activation row), which at batch 1 cost their latency, not their bytes.

    python bench/scaling.py [--context 8192] [--hbm-tbs 3.35] [--allreduce-us 8]
The assumptions are arguments; the defaults are an H100 SXM (3.35 TB/s HBM3, NVLink 4: ~450 GB/s per direction
per GPU) and ~8 us per small NCCL all-reduce on NVLink (a measured ballpark for 8-16 KB messages, not ours)."""
from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def linear_params(self) -> int:
        """Parameters of the linear layers TP splits: q, k, v, o, gate, up, down per layer."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * self.intermediate
        return per_layer * self.layers

    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        return self.linear_params() + 2 * self.lm_head_params()  # input embedding + lm_head (untied)

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


SHAPES = [
    Shape("Llama-3-8B", 4096, 32, 32, 8, 128, 14336, 128256),
    Shape("Llama-3-70B", 8192, 80, 64, 8, 128, 28672, 128256),
    Shape("Llama-3.1-405B", 16384, 126, 128, 8, 128, 53248, 128256),
]
# bytes per weight: int4 with one fp16 scale and one fp16 offset per group of 128 (Int4Weight, g128)
BYTES = {"bf16": 2.0, "int4 g128": 0.5 + 4 / 128}


def rows(context: int, hbm_tbs: float, allreduce_us: float, link_gbs: float):
    for shape in SHAPES:
        for fmt, per_weight in BYTES.items():
            for tp in (1, 2, 4, 8):
                weights = shape.linear_params() * per_weight / tp
                lm_head = shape.lm_head_params() * 2 / tp  # kept in bf16, vocab-parallel
                kv = shape.kv_bytes_per_token() * context / min(tp, shape.kv_heads)  # sharded by kv head
                per_token = weights + lm_head + kv
                hbm_ms = per_token / (hbm_tbs * 1e12) * 1e3
                calls = 2 * shape.layers if tp > 1 else 0
                message = shape.hidden * 2  # one bf16 activation row
                ring_bytes = 2 * (tp - 1) / tp * message  # each rank sends and receives this per all-reduce
                ar_ms = calls * (allreduce_us * 1e-3 + ring_bytes / (link_gbs * 1e9) * 1e3)
                resident = shape.linear_params() * per_weight / tp + 2 * shape.lm_head_params() * 2 / tp
                yield dict(model=shape.name, weights=fmt, tp=tp, resident_gb=resident / 1e9,
                           streamed_gb=per_token / 1e9, hbm_ms=hbm_ms, allreduce_calls=calls,
                           allreduce_kb=calls * ring_bytes / 1e3, allreduce_ms=ar_ms, token_ms=hbm_ms + ar_ms)


def markdown(context: int, hbm_tbs: float, allreduce_us: float, link_gbs: float) -> str:
    out = ["| model | weights | TP | GB resident per rank | GB streamed per token per rank | HBM ms | all-reduces "
           "(KB sent per rank) | all-reduce ms | ms per token | vs TP=1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows(context, hbm_tbs, allreduce_us, link_gbs):
        key = (r["model"], r["weights"])
        base.setdefault(key, r["token_ms"])
        out.append(f"| {r['model']} | {r['weights']} | {r['tp']} | {r['resident_gb']:.1f} | {r['streamed_gb']:.2f} | "
                   f"{r['hbm_ms']:.2f} | {r['allreduce_calls']} ({r['allreduce_kb']:.0f}) | {r['allreduce_ms']:.2f} | "
                   f"{r['token_ms']:.2f} | {base[key] / r['token_ms']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=8192, help="KV cache length per sequence (batch 1)")
    p.add_argument("--hbm-tbs", type=float, default=3.35, help="HBM bandwidth per GPU, TB/s")
    p.add_argument("--allreduce-us", type=float, default=8.0, help="latency of one small all-reduce, us")
    p.add_argument("--link-gbs", type=float, default=450.0, help="link bandwidth per GPU per direction, GB/s")
    args = p.parse_args(argv)
    print(markdown(args.context, args.hbm_tbs, args.allreduce_us, args.link_gbs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The `turbokernels` command: info, demo, bench, selftest."""
from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {"int4": "turbokernels.bench.int4", "sparse24": "turbokernels.bench.sparse24",
              "attention": "turbokernels.bench.attention", "attention_decode": "turbokernels.bench.attention_decode"}


def cmd_info(args) -> int:
    import torch

    import turbokernels as tk
    from turbokernels import _ext, backends
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"turbokernels {tk.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}")
    print(f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(f"turbokernels._C: {'loaded' if _ext.available() else 'not available (' + str(_ext.load_error()) + ')'}")
    print(f"forced backend: {backends.forced_backend() or 'none (automatic)'}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for op in backends.ops():
        if op.startswith("_"):
            continue
        print(f"op turbokernels::{op}")
        for name, impl in backends.registered(op).items():
            reason = {"triton": lambda: backends.check_triton(torch.empty(1, device=device)),
                      "cpu": lambda: _ext.missing_op_reason(op, "cpu"),
                      "cuda": lambda: _ext.missing_op_reason(op, "cuda") if device == "cuda" else "no CUDA device",
                      }.get(name, lambda: None)()
            state = "auto" if impl.auto else "only when forced (not yet validated on a GPU)"
            print(f"  {name:<10} {state}" + (f"; here: {reason}" if reason else ""))
    return 0


def cmd_demo(args) -> int:
    from turbokernels import demo
    try:
        demo.check_arguments(args.model, args.group_size, args.device)
    except (TypeError, ValueError) as exc:
        print(f"turbokernels demo: error: {exc}", file=sys.stderr)
        return 2
    demo.run(model=args.model, group_size=args.group_size, device=args.device)
    return 0


def cmd_bench(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.name])
    return module.main(args.rest)


def cmd_selftest(args) -> int:
    """Every backend that can run here against the float64 golden result, by the tests' tolerance rule
    (turbokernels.testing), on a few odd shapes, with a bias (added in fp32 before the output's one rounding)."""
    import torch

    import turbokernels as tk
    from turbokernels import backends
    from turbokernels.testing import error_report, matmul_allowance, operand_dtype
    failures = 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for (M, K, N, g) in ((1, 576, 97, 128), (17, 256, 64, 64), (64, 113, 40, 32)):
            w = tk.quantize_int4(torch.randn(N, K, device=device).to(dtype), group_size=g)
            x = torch.randn(M, K, device=device, dtype=dtype)
            bias = torch.randn(N, device=device).to(dtype)
            w64 = w.dequantize(torch.float64).t()  # the exact quantized weight, (K, N)
            golden = x.double() @ w64 + bias.double()
            for name, impl in backends.registered("int4_mm").items():
                args_ = (x, w.qweight, w.scales, w.offsets, w.effective_group_size, bias)
                if impl.check(*args_) is not None:
                    continue
                with tk.backend(name):
                    out = tk.int4_linear(x, w, bias)
                allowance = matmul_allowance(x, w64, bias=bias, operand_dtype=operand_dtype(name, dtype))
                err, _, ratio, bad = error_report(out, golden, allowance)
                ok = bad == 0
                failures += not ok
                print(f"{'ok ' if ok else 'BAD'} int4_mm {name:<9} {str(dtype):<15} M={M:<3} K={K:<4} N={N:<3} "
                      f"g={g:<4} max err {err:.2e} ({ratio:.2f} of the bound)")
    print("selftest passed" if not failures else f"selftest: {failures} failures")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="turbokernels", description="Triton/C++ kernels for transformer inference")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, the compiled extension, backends per op").set_defaults(fn=cmd_info)
    p = sub.add_parser("demo", help="quantize small real models to int4: error, memory, speed before/after")
    p.add_argument("--model", default="all", choices=["all", "minilm", "llama"])
    p.add_argument("--group-size", type=int, default=32,
                   help="int4 group size (default 32: SmolLM2's GGUF is Q4_1 in blocks of 32, which g32 reproduces)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("bench", help="run a benchmark (CSV + plot); extra arguments go to it")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    sub.add_parser("selftest", help="check every runnable backend against the reference").set_defaults(
        fn=cmd_selftest)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

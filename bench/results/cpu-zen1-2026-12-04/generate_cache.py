"""SmolLM2-135M (fp32, CPU) greedy decode: transformers' sdpa + DynamicCache vs attn_implementation="turbokernels"
(its own cache) vs turbokernels + KVCache (contiguous, paged 64), unpadded batch 1 and left-padded batch 2.
Interleaved rounds, median decode tokens/s (generate time minus a 1-token generate, per new token). Tokens must
match sdpa's. Run: python bench/results/cpu-zen1-2026-12-04/generate_cache.py"""
import os
import statistics
import time

import torch
import transformers

from turbokernels.demo import _smollm2_gguf
from turbokernels.integrations import transformers as tkt
from turbokernels.integrations.transformers_cache import KVCache

NEW, ROUNDS = 48, 3
folder, name = os.path.split(_smollm2_gguf())
model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
prompts = {
    "batch 1": (torch.tensor([[504, 3658, 338, 6357, 826, 260, 1120, 3604, 30, 657]]), torch.ones(1, 10, dtype=torch.long)),
    "batch 2 left-padded": (torch.tensor([[504, 3658, 338, 6357, 826, 260, 1120, 3604, 30, 657],
                                          [0, 0, 0, 0, 0, 2683, 314, 253, 1120, 30]]),
                            (torch.arange(10) >= torch.tensor([[0], [5]])).long()),
}


def variant(kind):
    def run(ids, mask, new):
        model.set_attn_implementation("sdpa" if kind == "sdpa" else tkt.register())
        kw = {}
        if kind.startswith("KVCache"):
            kw["cache"] = KVCache(model.config, batch_size=ids.shape[0], max_cache_len=ids.shape[1] + new,
                                  page_size=64 if "paged" in kind else None)
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)
    return run


kinds = ["sdpa", "turbokernels", "KVCache contiguous", "KVCache paged"]
print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}")
for label, (ids, mask) in prompts.items():
    times = {k: [] for k in kinds}
    ref = variant("sdpa")(ids, mask, NEW)
    for k in kinds:
        assert torch.equal(variant(k)(ids, mask, NEW), ref), k
    for _ in range(ROUNDS):
        for k in kinds:
            t0 = time.perf_counter(); variant(k)(ids, mask, 1); t1 = time.perf_counter()
            variant(k)(ids, mask, NEW); t2 = time.perf_counter()
            times[k].append((NEW - 1) / ((t2 - t1) - (t1 - t0)))
    base = statistics.median(times["sdpa"])
    for k in kinds:
        med = statistics.median(times[k])
        print(f"{label:22s} {k:20s} {med * ids.shape[0]:7.1f} tok/s  {med / base:5.2f}x sdpa  "
              f"(rounds {', '.join(f'{t * ids.shape[0]:.1f}' for t in times[k])}); tokens = sdpa's")

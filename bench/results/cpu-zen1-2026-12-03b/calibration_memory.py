"""Peak memory of tk.optimize(quant_method="gptq") calibration on a Llama-3.2-1B-shaped model (random weights,
1.24B parameters, fp32): layer by layer (calibration.py) against one pass over the whole model. GPTQ's column walk
is replaced by round to nearest (same Int4Weight) so that the run takes minutes; what is measured is the
calibration: the Hessians kept alive, the captured hidden states, the model.

    python calibration_memory.py layer   # or: one-pass
Peak RSS from getrusage (the process's high-water mark), after and before optimize.
"""
import resource
import sys
import time

import torch
import transformers

import turbokernels as tk
from turbokernels import calibration
from turbokernels.compress import gptq

mode = sys.argv[1]
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)
with torch.no_grad():
    model = transformers.LlamaForCausalLM(cfg).eval()
params = sum(p.numel() for p in model.parameters())
gptq.gptq_quantize = lambda w, h, group_size=128, symmetric=False, act_order=False: tk.quantize_int4(
    w, group_size=group_size, symmetric=symmetric)
if mode == "one-pass":
    calibration.find_blocks = lambda model, layers: None
calib = [torch.randint(0, 128256, (1, 128)) for _ in range(8)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t0 = time.perf_counter()
report = tk.optimize(model, attention=False, int4=True, quant_method="gptq", calibration=calib, progress=False)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{mode}: {params / 1e9:.2f}B parameters, 8 x 128 calibration tokens; {report['<calibration>']}; "
      f"peak RSS before optimize {before:.2f} GiB, after {peak:.2f} GiB; {time.perf_counter() - t0:.0f} s")

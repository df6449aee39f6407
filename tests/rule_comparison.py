"""The old tolerance rule against the new one on simulated bugs: run by hand, `python tests/rule_comparison.py`.

The old rule (until this issue) allowed max|ours - golden| <= 2 max|torch - golden| + eps(dtype) max(|x| @ |W|);
the new one is turbokernels.testing.assert_close (per element, derived from the computation). For the int4 shapes
of tests/test_int4_mm.py, a correct fp32-accumulated result and three wrong ones are built in plain torch (the
kernels' arithmetic, the bug applied) and judged by both rules. Output recorded in docs/reliability.md.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, turbokernels as tk
from _int4_cases import make_weight, golden_and_baseline, allowance
from turbokernels.testing import assert_close, matmul_allowance
from turbokernels.reference.int4_mm import dequantize_int4
def old_ok(ours, golden, baseline, scale):
    g = golden.double(); be = (baseline.double()-g).abs().max().item()
    bound = 2*be + torch.finfo(ours.dtype).eps*scale
    return (ours.double()-g).abs().max().item() <= bound
def new_ok(ours, golden, baseline, a):
    try: assert_close(ours, golden, baseline, allowance=a); return True
    except AssertionError: return False
SHAPES = [(1, 64, 1, 32), (1, 576, 97, 128), (3, 113, 40, 32), (16, 200, 64, -1), (17, 256, 113, 64), (33, 97, 17, 256), (64, 128, 96, 100)]
torch.manual_seed(0)
res = {}
for dtype in (torch.bfloat16, torch.float16):
  for M,K,N,g in SHAPES:
    w = make_weight(N, K, g, dtype=dtype); x = torch.randn(M, K).to(dtype); bias = torch.randn(N).to(dtype)
    W = dequantize_int4(w.qweight, w.scales, w.offsets, w.effective_group_size, K)  # fp32 (K,N)
    acc = x.float() @ W
    golden, baseline = golden_and_baseline(x, w, bias)
    scale = max(1.0, (x.abs().double() @ W.abs().double()).max().item())
    a = allowance(x, w, "reference", bias)
    muts = {
      "x1.01": ((acc + bias.float())*1.01).to(dtype),
      "bias-after-rounding": acc.to(dtype) + bias,
      "splitk-partials-in-dtype": sum((x[:, i:i+(K+3)//4].float() @ W[i:i+(K+3)//4]).to(dtype).float() for i in range(0, K, (K+3)//4)).add(bias.float()).to(dtype),
    }
    for name, out in muts.items():
      r = res.setdefault((str(dtype), name), [0, 0, 0])
      r[0] += 1; r[1] += old_ok(out, golden, baseline, scale); r[2] += new_ok(out, golden, baseline, a)
    ok = (acc + bias.float()).to(dtype)
    r = res.setdefault((str(dtype), "correct"), [0,0,0]); r[0]+=1; r[1]+=old_ok(ok, golden, baseline, scale); r[2]+=new_ok(ok, golden, baseline, a)
for k,(n,o,nw) in res.items(): print(f"{k[0]:15} {k[1]:26} shapes {n}: old rule accepts {o}, new rule accepts {nw}")

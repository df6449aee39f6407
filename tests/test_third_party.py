"""load_quantized: Hugging Face folders quantized by third-party tools, loaded into Int4Linear layers.

Each folder is written the way its tool writes it -- config.json with the quantization config under the tool's own
keys (AutoGPTQ's quantize_config.json, GPTQModel's checkpoint_format / pack_dtype / meta, optimum's exllama
settings, AutoAWQ's version "gemm", compressed-tensors' config_groups / ignore), safetensors in one file or in
shards with an index -- around a tiny random Llama whose linears hold known integers q, zero points and scales
packed by tests/int4_packers.py (written from each format's published code, not from the importers). Loading must
give (a) each layer's weight equal to the format's formula bit for bit, (b) the logits of the float model holding
those weights, (c) a report naming every linear; and a clear error for what it does not read.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch

import turbokernels as tk
from turbokernels.nn import Int4Linear

import int4_packers as P
from tiny_models import tiny_llama

PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
LINEARS = [f"model.layers.{i}.{p}" for i in range(2) for p in PROJS]


@pytest.fixture
def rng():
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))


def scales_fp16(rng, shape, dtype=torch.float16):
    """Scales of a plausible magnitude (weights up to ~0.3) over two octaves, so the logits stay moderate."""
    return torch.from_numpy(rng.uniform(0.004, 0.02, size=shape)).to(dtype)


# ---- one layer per format: the tensors a checkpoint holds, and the float64 weight its formula gives ----------------
def gptq_layer(rng, K, N, gs, version, sym, act_order):
    G = -(-K // gs)
    q = rng.integers(0, 16, size=(K, N))
    zeros = np.full((G, N), 8) if sym else rng.integers(0, 16, size=(G, N))
    if not sym:  # zero points of 0 at the start of each packed word and mid-word: v1's borrow from the next nibble
        zeros[:, ::8] = 0
        zeros[:, 3::8] = 0
    scales = scales_fp16(rng, (G, N))
    g_idx = P.group_index(K, gs)[rng.permutation(K)] if act_order else P.group_index(K, gs)
    return P.pack_gptq(q, zeros, scales, g_idx, version=version), P.golden_zero_point(q, zeros, scales, g_idx)


def awq_layer(rng, K, N, gs):
    G = K // gs
    q, zeros = rng.integers(0, 16, size=(K, N)), rng.integers(0, 16, size=(G, N))
    scales = scales_fp16(rng, (G, N))
    return P.pack_awq(q, zeros, scales), P.golden_zero_point(q, zeros, scales, P.group_index(K, gs))


def ct_layer(rng, K, N, gs, symmetric, scale_dtype):
    """compressed-tensors pack-quantized: gs = -1 is the channel strategy (scale [N, 1])."""
    G = 1 if gs == -1 else K // gs
    q = rng.integers(-8, 8, size=(N, K))
    zp = None if symmetric else rng.integers(-8, 8, size=(N, G))
    scale = scales_fp16(rng, (N, G), scale_dtype)
    g_idx = P.group_index(K, K if gs == -1 else gs)
    return P.pack_compressed_tensors(q, scale, zp), P.golden_compressed_tensors(q, scale, zp, g_idx)


# ---- the quantization configs, as each tool writes them -----------------------------------------------------------
def autogptq_config(gs, desc_act, sym, fmt):
    """AutoGPTQ 0.7's BaseQuantizeConfig.to_dict(), written as quantize_config.json."""
    return {"bits": 4, "group_size": gs, "damp_percent": 0.01, "desc_act": desc_act, "static_groups": False,
            "sym": sym, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
            "is_marlin_format": False, "quant_method": "gptq", "checkpoint_format": fmt}


def gptqmodel_config(gs, desc_act, sym, fmt):
    """GPTQModel's QuantizeConfig.to_dict() (quantize_config.json, and config.json's quantization_config)."""
    return {"bits": 4, "dynamic": None, "group_size": gs, "desc_act": desc_act, "sym": sym, "lm_head": False,
            "quant_method": "gptq", "checkpoint_format": fmt, "pack_dtype": "int32",
            "meta": {"quantizer": ["gptqmodel:2.2.0"], "uri": "https://github.com/modelcloud/gptqmodel",
                     "damp_percent": 0.01, "damp_auto_increment": 0.0025, "static_groups": False,
                     "true_sequential": True, "mse": 0.0}}


def optimum_config(gs, desc_act, sym):
    """transformers' GPTQConfig.to_dict() (optimum): format plus the legacy checkpoint_format, and the exllama
    kernel settings, which are loading options, not a layout."""
    return {"quant_method": "gptq", "bits": 4, "tokenizer": None, "dataset": None, "group_size": gs,
            "damp_percent": 0.1, "desc_act": desc_act, "sym": sym, "true_sequential": True, "format": "gptq",
            "checkpoint_format": "gptq", "use_cuda_fp16": False, "model_seqlen": None, "block_name_to_quantize": None,
            "module_name_preceding_first_block": None, "batch_size": 1, "pad_token_id": None, "use_exllama": True,
            "max_input_length": None, "exllama_config": {"version": 1}, "cache_block_outputs": True,
            "modules_in_block_to_quantize": None, "meta": None, "backend": "auto"}


def awq_config(gs, not_convert):
    """AutoAWQ's save_quantized: config.json's quantization_config."""
    return {"quant_method": "awq", "zero_point": True, "group_size": gs, "bits": 4, "version": "gemm",
            "modules_to_not_convert": not_convert}


def ct_config(gs, symmetric, targets):
    """llm-compressor's QuantizationConfig for W4A16 (compressed-tensors 0.9), pack-quantized."""
    weights = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None if gs == -1 else gs,
               "num_bits": 4, "observer": "minmax", "observer_kwargs": {},
               "strategy": "channel" if gs == -1 else "group", "symmetric": symmetric, "type": "int"}
    return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None, "targets": targets,
                                          "weights": weights}},
            "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "version": "0.9.2"}


# ---- a folder --------------------------------------------------------------------------------------------------------
CASES = {
    # layer: (rng, K, N) -> (the layer's tensors, its float64 weight); config: the quantization config, written to
    # config.json, quantize_config.json or both (where); tied embeddings, safetensors shards, layers left float,
    # and what the report must say of each quantized layer
    "gptq_v1_autogptq": dict(layer=lambda rng, K, N: gptq_layer(rng, K, N, 32, 1, False, False),
                             config=autogptq_config(32, False, False, "gptq"), where="quantize_config.json",
                             expect="Int4Linear <- GPTQ v1 g32 asym"),
    "gptq_v2_gptqmodel": dict(layer=lambda rng, K, N: gptq_layer(rng, K, N, 32, 2, True, False),
                              config=gptqmodel_config(32, False, True, "gptq_v2"), where="both", shards=2,
                              expect="Int4Linear <- GPTQ v2 g32 sym"),
    "gptq_desc_act_optimum": dict(layer=lambda rng, K, N: gptq_layer(rng, K, N, 32, 1, False, True),
                                  config=optimum_config(32, True, False), where="config.json",
                                  expect="Int4Linear <- GPTQ v1 g32 act-order asym"),
    "awq_gemm": dict(layer=lambda rng, K, N: awq_layer(rng, K, N, 16),
                     config=awq_config(16, ["layers.1.mlp.down_proj"]), where="config.json", tied=True,
                     float_layers={"model.layers.1.mlp.down_proj": "float (modules_to_not_convert)"},
                     expect="Int4Linear <- AWQ GEMM g16 asym"),
    "ct_asym_group": dict(layer=lambda rng, K, N: ct_layer(rng, K, N, 16, False, torch.bfloat16),
                          config=ct_config(16, False, ["Linear"]), where="config.json",
                          expect="Int4Linear <- compressed-tensors pack-quantized g16 asym"),
    "ct_sym_channel": dict(layer=lambda rng, K, N: ct_layer(rng, K, N, -1, True, torch.float16),
                           config=ct_config(-1, True, ["re:.*self_attn\\.", "re:.*mlp\\."]), where="config.json",
                           shards=2, expect="Int4Linear <- compressed-tensors pack-quantized per-channel sym"),
}


def write_folder(path, config: dict, tensors: dict, quant_config: dict, where: str, shards: int = 1):
    """config.json (+ quantize_config.json) and the weights, as the tools save them: safetensors with
    metadata {"format": "pt"}, sharded with a model.safetensors.index.json when shards > 1."""
    import safetensors.torch as st
    os.makedirs(path, exist_ok=True)
    cfg = dict(config)
    if where in ("config.json", "both"):
        cfg["quantization_config"] = quant_config
    if where in ("quantize_config.json", "both"):
        with open(os.path.join(path, "quantize_config.json"), "w") as f:
            json.dump(quant_config, f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    keys = sorted(tensors)
    if shards == 1:
        st.save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(path, "model.safetensors"),
                     metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        st.save_file({k: tensors[k].contiguous() for k in part}, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def build(case: str, path, rng):
    """Write the case's folder; returns (golden weights {layer: float64 (N, K)}, the float reference model)."""
    c = CASES[case]
    model = tiny_llama(tie_word_embeddings=c.get("tied", False))
    # the tools save fp16 checkpoints: the reference holds the same fp16 values, in fp32 (the parameters only:
    # model.half() would round the rotary inv_freq too, which is rebuilt in fp32 from the config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half())
    floats = c.get("float_layers", {})
    tensors = {k: v.half() for k, v in model.state_dict().items()}
    if c.get("tied", False):
        del tensors["lm_head.weight"]  # written once, under the embedding's name
    golden = {}
    for name in LINEARS:
        if name in floats:
            continue
        linear = model.get_submodule(name)
        packed, golden[name] = c["layer"](rng, linear.in_features, linear.out_features)
        del tensors[f"{name}.weight"]
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
        with torch.no_grad():
            linear.weight.copy_(golden[name].to(torch.float32))
    config = model.config.to_dict()
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="float16")  # as save_pretrained writes it
    write_folder(path, config, tensors, c["config"], c["where"], c.get("shards", 1))
    return golden, model


def logits_allowance(ref: torch.nn.Module, ids: torch.Tensor) -> tuple:
    """(the exact logits, the allowance) for a model that computes ref's function in fp32 from ref's weights.

    The loaded model and ref hold the same weights bit for bit ((a) checks it) and run the same operations in fp32;
    they differ only in the order each linear sums its products (the int4 kernel's order, act-order's permuted
    one). Two orders of the same sums have rounding errors of the same size, so the loaded model must be as close to
    the exact logits (ref in float64) as ref itself is in fp32: within 4x ref's own error, and never held to less
    than 16 ulp of the largest logit. A systematic difference -- a buffer or a weight rounded differently -- shows
    up well above that (an fp16-rounded rotary inv_freq: 100x)."""
    with torch.no_grad():
        exact = copy.deepcopy(ref).double()(input_ids=ids).logits
        own = float((ref(input_ids=ids).logits.double() - exact).abs().max())
    return exact, 4 * max(own, 16 * 2.0**-24 * float(exact.abs().max()))


@pytest.mark.parametrize("case", list(CASES))
def test_load(case, tmp_path, rng):
    golden, ref = build(case, tmp_path, rng)
    model, report = tk.load_quantized(tmp_path, dtype=torch.float32)
    c = CASES[case]
    # (a) each layer's weight is the format's formula, exactly
    for name, g in golden.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, Int4Linear), (name, type(layer))
        assert torch.equal(layer.dequantize(torch.float32), g.to(torch.float32)), name
    for name in c.get("float_layers", {}):
        assert type(model.get_submodule(name)) is torch.nn.Linear
    # (c) the report names every linear and what it became
    floats = {"lm_head": "float (compressed-tensors ignore)" if case.startswith("ct") else
              "float (stored unquantized)", **c.get("float_layers", {})}
    assert list(report) == LINEARS + ["lm_head"]
    assert report == {name: floats.get(name, c["expect"]) for name in LINEARS + ["lm_head"]}
    if c.get("tied"):
        assert model.lm_head.weight is model.model.embed_tokens.weight
    # (b) the logits of the float model holding the golden weights
    ids = torch.randint(0, 128, (2, 9))
    exact, allowance = logits_allowance(ref, ids)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    err = float((got.double() - exact).abs().max())
    assert got.dtype == torch.float32 and err <= allowance, (err, allowance)


def test_dtype_default_keeps_the_stored_dtypes(tmp_path, rng):
    build("gptq_v1_autogptq", tmp_path, rng)
    model, _ = tk.load_quantized(tmp_path)
    assert model.model.embed_tokens.weight.dtype == torch.float16
    assert model.model.layers[0].self_attn.q_proj.scales.dtype == torch.float16
    assert not model.training and all(p.device.type == "cpu" for p in model.parameters())


def test_wired_into_from_pretrained_and_the_cli(tmp_path, rng):
    from turbokernels.workflow import load_model
    golden, _ = build("ct_asym_group", tmp_path, rng)
    model = tk.from_pretrained(tmp_path)
    down = "model.layers.1.mlp.down_proj"
    assert torch.equal(model.get_submodule(down).dequantize(), golden[down].to(torch.float32))
    tk.save_pretrained(model, tmp_path / "ours")  # and on into our own checkpoint format, bit for bit
    again = tk.from_pretrained(tmp_path / "ours")
    assert torch.equal(again.get_submodule(down).dequantize(), golden[down].to(torch.float32))
    desc, tok, model, gguf = load_model(str(tmp_path))
    assert "compressed-tensors" in desc and gguf is None and tok is None
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int4Linear)
    assert model.model.embed_tokens.weight.dtype == torch.float32


# ---- refusals --------------------------------------------------------------------------------------------------------
def edit_json(path, name, fn):
    p = os.path.join(path, name)
    with open(p) as f:
        d = json.load(f)
    fn(d)
    with open(p, "w") as f:
        json.dump(d, f)


def edit_tensors(path, fn):
    import safetensors.torch as st
    p = os.path.join(path, "model.safetensors")
    tensors = st.load_file(p)
    fn(tensors)
    st.save_file({k: v.clone() for k, v in tensors.items()}, p)  # an edit may store one tensor under two names


def _set(d, **kv):
    d["quantization_config"].update(kv)


def _set_ct_weights(d, **kv):
    d["quantization_config"]["config_groups"]["group_0"]["weights"].update(kv)


REFUSALS = [
    # (case whose config.json is edited, edit, what the error must name)
    ("gptq_desc_act_optimum", lambda d: _set(d, bits=8), "8-bit"),
    ("gptq_desc_act_optimum", lambda d: _set(d, bits=3), "3-bit"),
    ("gptq_desc_act_optimum", lambda d: _set(d, checkpoint_format="marlin", format="marlin"), "Marlin"),
    ("gptq_desc_act_optimum", lambda d: _set(d, is_marlin_format=True), "marlin"),
    ("gptq_desc_act_optimum", lambda d: _set(d, quant_method="gptq_marlin"), "Marlin"),
    ("gptq_desc_act_optimum", lambda d: _set(d, checkpoint_format="bitblas", format="bitblas"), "bitblas"),
    ("gptq_desc_act_optimum", lambda d: _set(d, pack_dtype="int16"), "pack_dtype"),
    ("gptq_desc_act_optimum", lambda d: _set(d, dynamic={r"+:.*down": {"bits": 8}}), "dynamic"),
    ("gptq_desc_act_optimum", lambda d: _set(d, quant_method="exl2"), "exl2"),
    ("gptq_desc_act_optimum", lambda d: _set(d, quant_method="bitsandbytes"), "bitsandbytes"),
    ("awq_gemm", lambda d: _set(d, version="gemv"), "gemv"),
    ("awq_gemm", lambda d: _set(d, version="exllama"), "exllama"),
    ("awq_gemm", lambda d: _set(d, version="marlin"), "marlin"),
    ("awq_gemm", lambda d: _set(d, bits=8), "8-bit"),
    ("ct_asym_group", lambda d: _set(d, format="float-quantized"), "float-quantized"),
    ("ct_asym_group", lambda d: _set(d, format="marlin-24"), "marlin-24"),
    ("ct_asym_group", lambda d: _set(d, format="naive-quantized"), "naive-quantized"),
    ("ct_asym_group", lambda d: _set_ct_weights(d, num_bits=8), "8-bit"),
    ("ct_asym_group", lambda d: _set_ct_weights(d, type="float"), "type"),
    ("ct_asym_group", lambda d: _set(d, sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config"),
    ("ct_asym_group", lambda d: d["quantization_config"]["config_groups"]["group_0"].update(
        input_activations={"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}), "activations"),
]


@pytest.mark.parametrize("case,edit,named", REFUSALS, ids=[f"{c}-{n}-{i}" for i, (c, _, n) in enumerate(REFUSALS)])
def test_refused_configs(case, edit, named, tmp_path, rng):
    build(case, tmp_path, rng)
    edit_json(tmp_path, "config.json", edit)
    with pytest.raises(ValueError, match=named) as e:
        tk.load_quantized(tmp_path)
    assert "not supported" in str(e.value)


@pytest.fixture
def gptq_folder(tmp_path, rng):
    build("gptq_desc_act_optimum", tmp_path, rng)
    return tmp_path


K_PROJ = "model.layers.0.self_attn.k_proj"


@pytest.mark.parametrize("edit,named", [
    (lambda t: t.pop(f"{K_PROJ}.qzeros"), rf"{K_PROJ}\.qzeros is missing"),
    (lambda t: t.pop(f"{K_PROJ}.g_idx"), rf"{K_PROJ}\.g_idx is missing"),
    (lambda t: t.pop("model.norm.weight"), r"missing \['model\.norm\.weight'\]"),
    # k_proj (32 x 64) given q_proj's tensors (64 x 64)
    (lambda t: t.update({f"{K_PROJ}.{s}": t[f"model.layers.0.self_attn.q_proj.{s}"]
                         for s in ("qweight", "qzeros", "scales", "g_idx")}), rf"{K_PROJ}\.qweight.*64 x 64.*32 x 64"),
    (lambda t: t.update({f"{K_PROJ}.scales": t[f"{K_PROJ}.scales"][:, :16]}), rf"layer '{K_PROJ}'.*scales"),
    (lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:100]}),
     r"model\.embed_tokens\.weight: \(100, 64\) in the checkpoint, \(128, 64\)"),
    (lambda t: t.update({"model.layers.0.mlp.extra.qzeros": t[f"{K_PROJ}.qzeros"]}), r"extra\.qzeros"),
    (lambda t: t.update({"model.layers.9.mlp.up_proj.qweight": t[f"{K_PROJ}.qweight"]}), r"layers\.9\.mlp\.up_proj"),
    (lambda t: t.update({f"{K_PROJ}.bias": torch.zeros(32, dtype=torch.float16)}), rf"{K_PROJ}\.bias"),
], ids=["missing-qzeros", "missing-g_idx", "missing-float", "layer-shape", "scales-shape", "float-shape", "stray",
        "no-such-layer", "unexpected-bias"])
def test_tensors_that_do_not_fit(gptq_folder, edit, named):
    edit_tensors(gptq_folder, edit)
    with pytest.raises(ValueError, match=named):
        tk.load_quantized(gptq_folder)


def test_config_and_tensors_disagree(tmp_path, rng):
    build("awq_gemm", tmp_path, rng)  # layers.1.mlp.down_proj is stored float, as the config says
    edit_json(tmp_path, "config.json", lambda d: _set(d, modules_to_not_convert=["self_attn.k_proj"]))
    with pytest.raises(ValueError, match=r"k_proj.*keeps it float \(modules_to_not_convert\)"):
        tk.load_quantized(tmp_path)
    ct = tmp_path / "ct"
    build("ct_asym_group", ct, rng)
    edit_json(ct, "config.json", lambda d: _set(d, ignore=[]))  # lm_head is stored float but now targeted
    with pytest.raises(ValueError, match=r"lm_head\.weight.*group_0 targets it"):
        tk.load_quantized(ct)


def test_bad_arguments(tmp_path, rng):
    with pytest.raises(TypeError, match=r"load_quantized\(path\)"):
        tk.load_quantized(3)
    with pytest.raises(FileNotFoundError, match=r"load_quantized\(path\).*no such folder"):
        tk.load_quantized(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"load_quantized\(path\).*config\.json"):
        tk.load_quantized(tmp_path)
    build("awq_gemm", tmp_path, rng)
    with pytest.raises(TypeError, match=r"load_quantized\(dtype\)"):
        tk.load_quantized(tmp_path, dtype=torch.int8)
    with pytest.raises(ValueError, match=r"load_quantized\(device\)"):
        tk.load_quantized(tmp_path, device="nonsense")
    with pytest.raises(TypeError, match=r"load_quantized\(device\)"):
        tk.load_quantized(tmp_path, device=0.5)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"load_quantized\(device\): device='cuda'"):
            tk.load_quantized(tmp_path, device="cuda")
    edit_json(tmp_path, "config.json", lambda d: d.pop("quantization_config"))
    with pytest.raises(ValueError, match=r"load_quantized\(path\).*no quantization_config"):
        tk.load_quantized(tmp_path)

"""turbokernels.save_pretrained / from_pretrained: optimized models saved and loaded bit for bit; checkpoints that do
not fit refused with the target untouched."""
import json
import os

import pytest
import torch
from torch import nn

import turbokernels as tk

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
import tiny_models  # noqa: E402


def tiny_llama(hidden=64, tie=True):
    return tiny_models.tiny_llama(hidden_size=hidden, tie_word_embeddings=tie)


def _tk_modules(model):
    return [m for m in model.modules() if type(m).__module__.startswith("turbokernels")]


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sb[k].dtype and torch.equal(v, sb[k]), k


@torch.no_grad()
@pytest.mark.parametrize("how", ["int4", "sparse24_int4", "w4a8_bf16", "gptq_act_order"])
def test_hf_roundtrip_bit_exact(tmp_path, how):
    model = tiny_llama()
    if how == "w4a8_bf16":
        model = model.to(torch.bfloat16)
        tk.model.quantize_int4_(model, group_size=32, w4a8=True)
        tk.optimize(model)  # attention on top
    elif how == "gptq_act_order":  # act-order layers carry a permutation buffer
        tk.optimize(model, int4=True, group_size=32, quant_method="gptq", act_order=True,
                    calibration=[torch.randint(0, 128, (2, 16))])
        assert model.model.layers[0].mlp.down_proj.perm.numel() == 176
    else:
        tk.optimize(model, int4=True, sparse24=how == "sparse24_int4", group_size=32)
    ids = torch.randint(0, 128, (2, 9))
    ref = model(ids).logits
    tk.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "turbokernels.json"]
    loaded = tk.from_pretrained(tmp_path)  # rebuilt from the saved class and config
    assert type(loaded) is type(model) and loaded.config._attn_implementation == "turbokernels"
    assert [type(m) for m in _tk_modules(loaded)] == [type(m) for m in _tk_modules(model)]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    _same_state(loaded, model)
    assert torch.equal(loaded(ids).logits, ref)
    skeleton = tiny_llama()  # fresh random weights, same architecture
    if how == "w4a8_bf16":
        skeleton = skeleton.to(torch.bfloat16)
    assert tk.from_pretrained(tmp_path, model=skeleton) is skeleton
    assert torch.equal(skeleton(ids).logits, ref)
    back = tk.restore(loaded)  # the way back still works after loading
    assert back["<attention>"] == "transformers attention implementation 'sdpa'" and not _tk_modules(loaded)


@torch.no_grad()
def test_plain_module_needs_its_skeleton(tmp_path):
    model = tiny_models.MHABlock().eval()
    tk.optimize(model, sparse24=True, exclude=())
    x = torch.randn(2, 5, 32)
    ref = model(x)
    tk.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match=r"from_pretrained\(model\): the checkpoint holds no Hugging Face config"):
        tk.from_pretrained(tmp_path)
    skeleton = tiny_models.MHABlock().eval()
    tk.from_pretrained(tmp_path, model=skeleton)
    assert isinstance(skeleton.mha, tk.nn.MultiheadAttention) and isinstance(skeleton.proj, tk.nn.Sparse24Linear)
    assert torch.equal(skeleton(x), ref)


@torch.no_grad()
def test_gpt2_conv1d(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    tk.optimize(model, attention=False, int4=True, group_size=32)
    ids = torch.randint(0, 96, (1, 11))
    ref = model(ids).logits
    tk.save_pretrained(model, tmp_path)
    skeleton = transformers.GPT2LMHeadModel(cfg).eval()
    tk.from_pretrained(tmp_path, model=skeleton)
    assert torch.equal(skeleton(ids).logits, ref)
    assert torch.equal(tk.from_pretrained(tmp_path)(ids).logits, ref)


def _untouched(skeleton, fn):
    state = {k: v.clone() for k, v in skeleton.state_dict().items() if isinstance(v, torch.Tensor)}
    impl = skeleton.config._attn_implementation
    fn()
    assert not _tk_modules(skeleton) and skeleton.config._attn_implementation == impl
    assert all(torch.equal(v, skeleton.state_dict()[k]) for k, v in state.items())


def _expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_each_kind_of_mismatch(tmp_path):
    model = tiny_llama()
    tk.optimize(model, int4=True, group_size=32)
    tk.save_pretrained(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    meta = json.loads((tmp_path / "turbokernels.json").read_text())

    skeleton = tiny_llama(hidden=128)
    _untouched(skeleton, lambda: _expect(ValueError, r"is 128 x 128; the checkpoint's Int4Linear is 64 x 64",
                                         lambda: tk.from_pretrained(tmp_path, model=skeleton)))
    skeleton = nn.Sequential(nn.Linear(4, 4))
    _expect(ValueError, r"from_pretrained\(model\): has no module 'model.layers.0.self_attn.q_proj'",
            lambda: tk.from_pretrained(tmp_path, model=skeleton))
    assert type(skeleton[0]) is nn.Linear

    # a packed tensor of the wrong shape, and a plain tensor of the wrong shape
    tensors = safetensors_torch.load_file(str(weights))
    bad = dict(tensors)
    bad["model.layers.1.mlp.up_proj.qweight"] = bad["model.layers.1.mlp.up_proj.qweight"][:-1].clone()
    folder = tmp_path / "bad_packed"
    folder.mkdir()
    safetensors_torch.save_file(bad, str(folder / "model.safetensors"))
    (folder / "turbokernels.json").write_text(json.dumps(meta))
    skeleton = tiny_llama()
    _untouched(skeleton, lambda: _expect(ValueError, r"from_pretrained\(path\): module 'model.layers.1.mlp.up_proj' "
                                                     r"\(Int4Linear\)", lambda: tk.from_pretrained(folder, skeleton)))
    bad = dict(tensors)
    bad["model.norm.weight"] = torch.ones(65)
    safetensors_torch.save_file(bad, str(folder / "model.safetensors"))
    _untouched(skeleton, lambda: _expect(ValueError, r"does not fit this model: different \['model.norm.weight: "
                                                     r"\(65,\)", lambda: tk.from_pretrained(folder, skeleton)))
    bad = dict(tensors)
    del bad["model.norm.weight"]
    bad["model.extra"] = torch.ones(3)
    safetensors_torch.save_file(bad, str(folder / "model.safetensors"))
    _untouched(skeleton, lambda: _expect(ValueError, r"missing \['model.norm.weight'\]; unexpected \['model.extra'\]",
                                         lambda: tk.from_pretrained(folder, skeleton)))
    # the description itself
    (folder / "turbokernels.json").write_text(json.dumps(dict(meta, format="other/9")))
    _expect(ValueError, r"from_pretrained\(path\): turbokernels.json is not a turbokernels/1",
            lambda: tk.from_pretrained(folder, skeleton))
    (folder / "turbokernels.json").write_text("{not json")
    _expect(ValueError, r"turbokernels.json is not readable JSON", lambda: tk.from_pretrained(folder, skeleton))
    (folder / "model.safetensors").write_bytes(b"garbage")
    (folder / "turbokernels.json").write_text(json.dumps(meta))
    _expect(ValueError, r"model.safetensors is not a readable safetensors file",
            lambda: tk.from_pretrained(folder, skeleton))
    _expect(FileNotFoundError, r"has no turbokernels.json", lambda: tk.from_pretrained(tmp_path / "nowhere"))
    _expect(TypeError, r"from_pretrained\(path\)", lambda: tk.from_pretrained(3))
    _expect(TypeError, r"from_pretrained\(model\)", lambda: tk.from_pretrained(tmp_path, model="llama"))
    _expect(TypeError, r"save_pretrained\(model\)", lambda: tk.save_pretrained("llama", tmp_path))
    _expect(TypeError, r"save_pretrained\(path\)", lambda: tk.save_pretrained(model, None))
    assert not _tk_modules(skeleton)

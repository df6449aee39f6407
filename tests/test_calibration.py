"""Layer-by-layer calibration (calibration.py): each block is calibrated on what the already compressed blocks
before it produce, one block's statistics alive at a time, and models whose blocks are not a chain fall back to one
pass."""
import copy
import weakref

import pytest
import torch
from torch import nn

import turbokernels as tk
from turbokernels.compress import gptq as gptq_module

transformers = pytest.importorskip("transformers")
from tiny_models import tiny_llama  # noqa: E402


def _spy_gptq(monkeypatch):
    """Record the Hessian each layer is quantized with, and how many Hessian accumulators are alive then."""
    seen, alive = {}, weakref.WeakSet()
    real_init, real_quantize = gptq_module.HessianAccumulator.__init__, gptq_module.gptq_quantize

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        alive.add(self)

    def quantize(weight, hessian, **kwargs):
        seen[len(seen)] = (tuple(weight.shape), hessian.clone(), len(alive))
        return real_quantize(weight, hessian, **kwargs)

    monkeypatch.setattr(gptq_module.HessianAccumulator, "__init__", init)
    monkeypatch.setattr(gptq_module, "gptq_quantize", quantize)
    return seen


def _input_hessian(model, module, calib):
    xs = []
    h = module.register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for x in calib:
            model(x, use_cache=False)
    h.remove()
    x = torch.cat(xs)
    return x.t() @ x / x.shape[0]


def test_each_block_is_calibrated_on_the_compressed_blocks_before_it(monkeypatch):
    base = tiny_llama()
    calib = [torch.randint(0, 128, (2, 16)) for _ in range(3)]
    seen = _spy_gptq(monkeypatch)
    model = copy.deepcopy(base)
    report = tk.optimize(model, attention=False, int4=True, group_size=32, quant_method="gptq", calibration=calib,
                         progress=False)
    assert report["<calibration>"] == "layer by layer over model.layers (2 blocks)"
    # layers are quantized in model order: block 1's q_proj is the 8th call (q, k, v, o, gate, up, down, q, ...)
    shape, used, alive = seen[7]
    assert shape == (64, 64)
    # its Hessian is that of what block 1 receives once block 0 is quantized (the final model's block 0: block 1's
    # input does not depend on anything after it) -- not what it receives in the float model
    after = _input_hessian(model, model.model.layers[1].self_attn.q_proj, calib)
    float_model = _input_hessian(base, base.model.layers[1].self_attn.q_proj, calib)
    torch.testing.assert_close(used.double(), after, rtol=1e-4, atol=1e-6)
    assert (used.double() - float_model).abs().max() > 100 * (used.double() - after).abs().max()
    # one block's statistics alive at a time: q/k/v share one, o one, gate/up one, down one
    assert max(a for _, _, a in seen.values()) == 4
    # block 0 saw exactly the float model's inputs
    torch.testing.assert_close(seen[0][1].double(), _input_hessian(base, base.model.layers[0].self_attn.q_proj,
                                                                     calib), rtol=1e-4, atol=1e-6)


class _Parallel(nn.Module):
    """Blocks run side by side on the same input: not a chain, so calibration must not chain them."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(3))

    def forward(self, x):
        return sum(b(x) for b in self.blocks)


@torch.no_grad()
def test_blocks_that_are_not_a_chain_get_one_pass():
    model = _Parallel()
    calib = [torch.randn(4, 16) * torch.logspace(-2, 1, 16) for _ in range(2)]
    x = torch.cat(calib)
    weights = {f"blocks.{i}.0": model.blocks[i][0].weight.detach().clone() for i in range(3)}
    report = tk.optimize(model, attention=False, sparse24=True, prune_method="wanda", calibration=calib,
                         exclude=(), progress=False)
    assert report["<calibration>"] == ("one pass over the model (not layer by layer: block 1 does not receive "
                                       "block 0's output)")
    for name, w in weights.items():  # every block's statistic is its (float) input's: x itself
        expected = tk.prune_24(w, method="wanda", activation_norm=x.square().sum(0).sqrt())
        torch.testing.assert_close(model.get_submodule(name).to_dense(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_chain_found_in_other_families(family):
    """GPT-2 passes its block arguments by position, BERT returns tuples: both are recognized as chains (block 0's
    output computed from its captured inputs is what block 1 received, with the same other arguments)."""
    if family == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=64,
                                                                     n_layer=3, n_head=4)).eval()
        prefix = "transformer.h"
    else:
        model = transformers.BertModel(transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3,
                                                               num_attention_heads=4, intermediate_size=128)).eval()
        prefix = "encoder.layer"
    calib = [torch.randint(0, 96, (2, 12)) for _ in range(2)]
    ids = torch.randint(0, 96, (1, 10))
    with torch.no_grad():
        ref = model(ids)[0]
    report = tk.optimize(model, attention=False, int4=True, group_size=32, quant_method="gptq", calibration=calib,
                         progress=False)
    assert report["<calibration>"] == f"layer by layer over {prefix} (3 blocks)"
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(model(ids)[0].flatten(1), ref.flatten(1)).min()
    assert cos > 0.95


def test_an_error_while_calibrating_leaves_the_model_untouched(monkeypatch):
    """Block 0's layers are in place while block 1 is calibrated; an error there puts the originals back."""
    model = tiny_llama()
    originals = {n: m for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    real = gptq_module.gptq_quantize
    calls = []

    def failing(weight, hessian, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise ValueError("made to fail")
        return real(weight, hessian, **kwargs)

    monkeypatch.setattr(gptq_module, "gptq_quantize", failing)
    with pytest.raises(ValueError, match=r"optimize\(model\): layer 'model.layers.1.self_attn.v_proj': made to fail"):
        tk.optimize(model, attention=False, int4=True, group_size=32, quant_method="gptq",
                    calibration=[torch.randint(0, 128, (1, 8))], progress=False)
    assert all(model.get_submodule(n) is m for n, m in originals.items() if n)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())

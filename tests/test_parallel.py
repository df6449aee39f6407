"""Tensor parallelism (turbokernels.parallel): 2 processes on this machine, gloo over the loopback interface.

Every scenario runs in both ranks (turbokernels/testing_parallel.py) with the same tiny Llama, so each rank holds
the unsharded model's answer as well. The rule for the logits (FlashAttention's): the sharded model's error against
a float64 model of the same quantized/pruned weights is within twice the unsharded model's own error (plus a few
units of the dtype's roundoff at the logits' scale, for when that error is tiny); fp32 gives the same greedy
tokens. Splitting a row-parallel layer only changes the order of the sum (two partial products, one all-reduce).
"""
import pytest
import torch
import torch.distributed as dist

from turbokernels import testing_parallel as tp
from turbokernels.testing import unit_roundoff

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

_CACHE = {}


def ranks(tmp_path_factory, scenario, **kwargs):
    key = (scenario, tuple(sorted(kwargs.items())))
    if key not in _CACHE:
        folder = str(tmp_path_factory.mktemp(f"tp_{scenario}"))
        _CACHE[key] = tp.run_ranks(scenario, folder, **kwargs)
    return _CACHE[key]


def _within_rule(sharded, single, ref64, dtype):
    err_single = (single.double() - ref64).abs().max().item()
    err_sharded = (sharded.double() - ref64).abs().max().item()
    floor = 8 * unit_roundoff(dtype) * ref64.abs().max().item()
    assert err_sharded <= 2 * err_single + floor, (err_sharded, err_single, floor)


def _check_logits(r, dtype):
    _within_rule(r["sharded_logits"], r["single_logits"], r["ref64"], dtype)
    # and it was computed differently: a test that compared the unsharded model with itself would pass above
    assert not torch.equal(r["single_logits"], r["sharded_logits"])


@pytest.mark.parametrize("kind, expected", [("int4", "Int4Linear"), ("sparse24", "Sparse24Linear"),
                                            ("int4+sparse24", "Sparse24Int4Linear")])
def test_tp2_matches_one_process_fp32(tmp_path_factory, kind, expected):
    results = ranks(tmp_path_factory, "logits", kind=kind)
    for r in results:
        assert r["sharded_kinds"] == [expected, "lm_head (Shard(dim=0),)"]
        assert r["attention"] == "turbokernels"
        _check_logits(r, torch.float32)
        assert torch.equal(r["single_tokens"], r["sharded_tokens"])
        # generate over turbokernels' KV cache: each rank caches and decodes its own KV heads
        assert torch.equal(r["cache_tokens"], r["single_tokens"])
        assert r["cache_keys_shape"][2] == tp.KV_HEADS // 2
        assert r["single_tokens"].shape[1] == tp.prompt().shape[1] + 6
    # the row-parallel output is replicated: both ranks hold the same logits
    assert torch.equal(results[0]["sharded_logits"], results[1]["sharded_logits"])


def test_tp2_transformers_whole_plan_with_vocab_parallel_embedding(tmp_path_factory):
    for r in ranks(tmp_path_factory, "logits", kind="int4", whole_plan=True):
        assert r["sharded_kinds"] == ["Int4Linear", "lm_head (Shard(dim=0),)", "model.embed_tokens (Shard(dim=0),)"]
        _check_logits(r, torch.float32)
        assert torch.equal(r["single_tokens"], r["sharded_tokens"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tp2_matches_one_process_16bit(tmp_path_factory, dtype):
    for r in ranks(tmp_path_factory, "logits", kind="int4+sparse24", dtype=dtype):
        _check_logits(r, getattr(torch, dtype))


@pytest.mark.parametrize("kind", ["int4", "int4+sparse24"])
def test_shard_then_optimize_equals_optimize_then_shard(tmp_path_factory, kind):
    """Quantizing (and pruning) each rank's shard gives exactly the shard of the whole weight's quantization: the
    splits are group-aligned, and 2:4 groups of 4 inputs never straddle a split."""
    for r in ranks(tmp_path_factory, "orders", kind=kind):
        first, second = r["first"], r["second"]
        assert first.keys() == second.keys()
        packed = [k for k in first if k.endswith((".qweight", ".meta", ".values"))]
        assert len(packed) == 7 * tp.LAYERS * (2 if "sparse24" in kind and "int4" in kind else 1)
        for k in first:
            assert first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]), k
        assert torch.equal(r["logits_first"], r["logits_second"])
        assert sum(v.endswith("colwise shard") for v in r["report"].values()) == 5 * tp.LAYERS
        assert sum(v.endswith("rowwise shard") for v in r["report"].values()) == 2 * tp.LAYERS
        # restore() of the sharded model: plain nn.Linear shards, the same function as the unsharded restore
        assert sum(v.startswith("nn.Linear") and v.endswith("shard)") for v in r["restore_report"].values()) == \
            7 * tp.LAYERS
        _within_rule(r["restored"], r["restored_whole"], r["restored_ref64"], torch.float32)


def test_layouts_local_path_and_dtensor_path_both_orders(tmp_path_factory):
    """torch's default layouts take the local path (plain tensors, one all_reduce); other layouts (the output
    gathered and split again, a sequence-parallel reduce-scatter) the DTensor path with torch's hooks, also when the
    model was sharded before it was optimized (the nn.Linear's hooks carried over), and return what the style
    promises."""
    flags = {"default": [True, True], "gathered between": [False, False], "sequence-parallel output": [True, False]}
    returns = {"default": "Tensor", "gathered between": "Tensor", "sequence-parallel output": "DTensor (Shard(dim=1),)"}
    for r in ranks(tmp_path_factory, "styles"):
        assert len(r) == 2 * 3 * 2
        for label, (want, ref64, got, local_io, returned) in r.items():
            _within_rule(got, want, ref64, torch.float32)
            plan = next(k for k in flags if k in label)
            assert local_io == flags[plan], label
            assert returned == returns[plan], label


def test_save_pretrained_of_a_sharded_model_writes_the_whole_model(tmp_path_factory):
    import turbokernels as tk
    target = str(tmp_path_factory.mktemp("tp_checkpoint"))
    results = ranks(tmp_path_factory, "save", target=target)
    whole = tp.optimized_llama("int4+sparse24")
    loaded = tk.from_pretrained(target)
    sw, sl = whole.state_dict(), loaded.state_dict()
    assert sw.keys() == sl.keys()
    for k, v in sw.items():
        if isinstance(v, torch.Tensor):
            assert v.dtype == sl[k].dtype and torch.equal(v, sl[k]), k
    exact = tp.optimized_llama("int4+sparse24")
    tk.restore(exact)
    with torch.no_grad():
        logits, single = loaded(tp.prompt()).logits, whole(tp.prompt()).logits
        ref64 = exact.double()(tp.prompt()).logits
    assert torch.equal(logits, single)
    # the sharded model computed what the reloaded unsharded one does, up to the order of the row-parallel sums
    for r in results:
        _within_rule(r["logits"], single, ref64, torch.float32)


def test_load_state_dict_into_a_sharded_model(tmp_path_factory):
    """Whole tensors (each rank takes its slice) and torch's distributed checkpoint (DTensors) load into a sharded
    model of other weights and give the sharded model's own logits bit for bit; a bad tensor changes nothing."""
    target = str(tmp_path_factory.mktemp("tp_dcp"))
    for r in ranks(tmp_path_factory, "load", target=target):
        want, before, got = r["whole"]
        assert not torch.equal(before, want)  # the other model's weights did differ
        assert torch.equal(got, want)
        assert torch.equal(r["dcp"][2], want)
        assert "down_proj" in r["bad"] and "qweight" in r["bad"], r["bad"]
        assert torch.equal(r["bad unchanged"], want)


def test_torch_compile_fullgraph_of_sharded_layers(tmp_path_factory):
    for r in ranks(tmp_path_factory, "compile"):
        assert set(r) == {"int4", "int4+sparse24"}
        for eager, compiled, ref64 in r.values():
            _within_rule(compiled, eager, ref64, torch.float32)


def test_refusals_name_the_rule_and_change_nothing(tmp_path_factory):
    for r in ranks(tmp_path_factory, "refusals"):
        expect = {
            "int4 rowwise group": "must be a multiple of 64 (group_size=64",
            "int4 colwise odd N": "out_features=33 over 2 ranks",
            "int4 rowwise words": "must be a multiple of 8 (an int4 word",
            "sparse24 rowwise meta": "must be a multiple of 16 (an int16 of 2:4 metadata",
            "sparse24int4 rowwise group": "must be a multiple of 64 (group_size=64",
            "int4 rowwise act-order": "act-order (perm): rank 0's rows read input features outside its slice",
            "bad style": "style must be 'colwise' or 'rowwise'",
            "not packed": "TypeError: colwise sharding of Linear: expected a turbokernels packed layer",
            "optimize gptq": "layer 'model.layers.0.self_attn.q_proj' is tensor-parallel: calibrated methods",
            "optimize per-channel rowwise": "layer 'model.layers.0.self_attn.o_proj': rowwise sharding of "
                                            "Int4Linear: this rank's shard has one group over its 64 inputs",
            "optimize hf loader": "layer 'model.layers.0.mlp.down_proj': sharded by transformers' tensor-parallel "
                                  "loader",
        }
        for label, text in expect.items():
            assert text in r[label], (label, r[label])
            assert r[label + " unchanged"] is True, label
        checked = ["act-order local", "per-channel", "w4a8"] + [f"{style} bias {cls}" for style in
                                                                  ("colwise", "rowwise") for cls in
                                                                  ("Int4Linear", "Sparse24Linear", "Sparse24Int4Linear")]
        for label in checked:
            want, got = r[label]
            assert (got - want).abs().max() <= 16 * unit_roundoff(torch.float32) * want.abs().max(), label


def _tp1(folder, backend, dtype):
    results = tp.run_ranks("logits", folder, world=1, backend=backend, kind="int4+sparse24", dtype=dtype)
    r = results[0]
    assert r["sharded_kinds"] == ["Sparse24Int4Linear", "lm_head (Shard(dim=0),)"]
    ref = r["ref64"]
    err_single = (r["single_logits"].double() - ref).abs().max().item()
    err_sharded = (r["sharded_logits"].double() - ref).abs().max().item()
    assert err_sharded <= 2 * err_single + 8 * unit_roundoff(getattr(torch, dtype)) * ref.abs().max().item()
    assert torch.equal(r["single_tokens"], r["sharded_tokens"])


def test_tp1_gloo(tmp_path_factory):
    """A mesh of one rank: the DTensor layers and the hooks, nothing split (the one-GPU case's path, on CPU)."""
    _tp1(str(tmp_path_factory.mktemp("tp1")), "gloo", "float32")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tp1_nccl_on_one_gpu(tmp_path_factory, monkeypatch):
    """One GPU: the NCCL path at TP=1 only (the mesh, the DTensor layers, the hooks; no split)."""
    if not dist.is_nccl_available():
        pytest.skip("NCCL is not available")
    monkeypatch.setenv("TK_TP_CUDA", "1")
    _tp1(str(tmp_path_factory.mktemp("tp_nccl")), "nccl", "float16")


def test_tp_plan_from_transformers_config_and_its_errors():
    """No process group needed: the plan is names and styles."""
    import transformers
    from torch import nn
    import turbokernels as tk
    from turbokernels.parallel import ColwiseParallel, RowwiseParallel
    model = tp.tiny_llama()
    plan = tk.parallel.tp_plan(model)
    assert set(plan) == {f"model.{k}" for k in transformers.LlamaConfig().base_model_tp_plan}
    assert type(plan["model.layers.*.self_attn.q_proj"]) is ColwiseParallel
    assert type(plan["model.layers.*.mlp.down_proj"]) is RowwiseParallel
    assert set(tk.parallel.tp_plan(model, include_lm_head=True)) == set(plan) | {"lm_head"}
    assert set(tk.parallel.tp_plan(model, plan=model.tp_plan)) == set(model.tp_plan)  # transformers' whole plan
    assert set(tk.parallel.tp_plan(model.model)) == set(transformers.LlamaConfig().base_model_tp_plan)
    seq = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    assert type(tk.parallel.tp_plan(seq, plan={"0": "colwise", "1": "rowwise"})["1"]) is RowwiseParallel
    with pytest.raises(ValueError, match=r"no config.base_model_tp_plan .* pass plan="):
        tk.parallel.tp_plan(seq)
    with pytest.raises(ValueError, match=r"entry '0': style 'sequence' is not one of"):
        tk.parallel.tp_plan(seq, plan={"0": "sequence"})
    with pytest.raises(ValueError, match=r"no module of the model matches any of \['fc'\]"):
        tk.parallel.tp_plan(seq, plan={"fc": "colwise"})
    with pytest.raises(TypeError, match=r"tp_plan\(model\): expected an nn.Module"):
        tk.parallel.tp_plan("model")
    with pytest.raises(TypeError, match=r"tp_plan\(plan\): expected a dict"):
        tk.parallel.tp_plan(seq, plan=[("0", "colwise")])

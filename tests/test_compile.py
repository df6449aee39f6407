"""torch.compile with inductor (the other tests trace with aot_eager) and CUDA graphs.

CPU: one function calling every turbokernels op (and attention's backward through it) compiled ONCE with
backend="inductor", fullgraph (inductor costs tens of seconds a compile on a small machine); its results against
eager, and every torch.ops.turbokernels.* op found both in dynamo's graph and in the code inductor generated (the
ops run as extern kernels: a fake impl that lies, or a mutation inductor loses, shows up here). A tiny int4 Llama
with attn_implementation="turbokernels" compiled whole with inductor: logits against eager, with int4_mm and decode_attention (the mask transformers
builds while tracing, checked in the graph) in it.

GPU (@pytest.mark.gpu): torch.compile(mode="reduce-overhead") of that Llama decoding greedily from HF's StaticCache
gives eager's tokens with no cudagraph skip and int4_mm inside the graph; a decode step (kv_cache_append +
decode_attention) captured in a torch.cuda.CUDAGraph and replayed step after step equals the same steps run eagerly.
"""
import inspect
import re

import pytest
import torch

import turbokernels as tk
from turbokernels.ops import _library

from tiny_models import tiny_llama


class _Recorder:
    """A torch.compile backend: inductor (what backend="inductor" runs), keeping dynamo's graphs (one per compiled
    frame)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx
        self.graphs.append(gm)
        return compile_fx(gm, example_inputs)

    def ops(self) -> set:
        """Names of the torch.ops.turbokernels.* called in the graphs."""
        return {str(n.target).split(".")[1] for g in self.graphs for n in g.graph.nodes
                if n.op == "call_function" and str(n.target).startswith("turbokernels.")}


def _all_ops_inputs():
    torch.manual_seed(0)

    def dense(out_f, in_f):
        return torch.randn(out_f, in_f) * 0.1

    weights = dict(int4=tk.quantize_int4(dense(48, 64), group_size=32),
                   w4a8=tk.quantize_int4(dense(40, 64), group_size=32),
                   s24=tk.Sparse24Weight.from_dense(tk.prune_24(dense(48, 64))),
                   s24_int4=tk.Sparse24Int4Weight.from_dense(tk.prune_24(dense(32, 64)), group_size=32))
    bias = torch.randn(48)
    x = torch.randn(5, 64)
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 2, 16), torch.randn(2, 9, 2, 16)
    cache = torch.randn(2, 2, 32, 2, 16)  # k and v caches (2, max_seqlen 32, heads_kv 2, head_dim 16)
    seqlens = torch.tensor([5, 20], dtype=torch.int32)
    q_new, k_new, v_new = torch.randn(2, 1, 4, 16), torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    return weights, bias, (x, q, k, v, cache[0], cache[1], seqlens, q_new, k_new, v_new)


def _every_op(weights, bias):
    """One function over every functional entry, with torch ops around them for inductor to fuse."""
    def fn(x, q, k, v, k_cache, v_cache, seqlens, q_new, k_new, v_new):
        int4 = tk.int4_linear(x, weights["int4"], bias)
        w4a8 = tk.w4a8_linear(x, weights["w4a8"])
        s24 = tk.sparse24_linear(x, weights["s24"], bias)
        s24_int4 = tk.sparse24_int4_linear(x, weights["s24_int4"])
        mixed = (int4 + s24).relu().sum(-1) + w4a8.sum(-1) - s24_int4.mean(-1)
        att = tk.attention(q, k, v, causal=True)
        loss = (att.float() * 1.5).square().sum()
        new_lens = tk.kv_cache_append(k_cache, v_cache, k_new, v_new, seqlens)
        dec = tk.decode_attention(q_new, k_cache, v_cache, new_lens)
        cache_sum = k_cache.sum() + 2 * v_cache.sum()  # read after the append: must see the new rows
        return int4, w4a8, s24, s24_int4, mixed, att, loss, new_lens, dec, cache_sum
    return fn


def test_inductor_compiles_every_op_in_one_graph():
    from torch._inductor.utils import run_and_get_code
    weights, bias, inputs = _all_ops_inputs()
    fn = _every_op(weights, bias)
    names = ("int4", "w4a8", "s24", "s24_int4", "mixed", "att", "loss", "new_lens", "dec", "cache_sum")

    def run(f, inputs):
        x, q, k, v, kc, vc, *rest = (t.clone() for t in inputs)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        out = f(x, *leaves, kc, vc, *rest)
        grads = torch.autograd.grad(out[names.index("loss")], leaves)
        return dict(zip(names, out)), grads, (kc, vc)

    def check(got, expected):
        (out, grads, caches), (ref, ref_grads, ref_caches) = got, expected
        # the same kernels ran on the same inputs: the ops' outputs are equal; inductor's own fused reductions
        # agree to rounding
        for name in ("int4", "w4a8", "s24", "s24_int4", "att", "new_lens", "dec"):
            assert torch.equal(out[name], ref[name]), name
        for name in ("mixed", "loss", "cache_sum"):
            torch.testing.assert_close(out[name], ref[name], rtol=1e-5, atol=1e-5, msg=name)
        for a, b in zip(caches, ref_caches):
            assert torch.equal(a, b)  # kv_cache_append's in-place writes reached the caller's caches
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    recorder = _Recorder()
    compiled = torch.compile(fn, fullgraph=True, backend=recorder)
    # the code inductor generates for the forward and (at the first backward) the backward graph
    got, code = run_and_get_code(run, compiled, inputs)
    check(got, run(fn, inputs))
    assert len(recorder.graphs) == 1  # fullgraph: one frame, compiled once
    every = set(_library.OPS)
    forward = every - {"attention_bwd"}  # the backward op is added by AOTAutograd, below dynamo's graph
    assert recorder.ops() == forward, f"dynamo's graph: {sorted(recorder.ops())}, expected {sorted(forward)}"
    generated = {m for c in code for m in re.findall(r"torch\.ops\.turbokernels\.(\w+)", c)}
    assert generated == every, (f"inductor's code calls {sorted(generated)}; every op: {sorted(every)} (a new op "
                                f"belongs in _every_op)")

    # new values (other cache lengths too) run the same compiled graph, no recompile, and still match eager
    inputs = tuple(t * 0.5 + 0.25 if t.is_floating_point() else t + 3 for t in inputs)
    check(run(compiled, inputs), run(fn, inputs))
    assert len(recorder.graphs) == 1


@torch.no_grad()
def test_inductor_compiles_an_int4_llama():
    """The model-level case of tests/test_optimize.py's aot_eager test, with inductor: every linear but the head
    int4 (Int4Linear -> int4_mm), attn_implementation="turbokernels". One decoder layer: inductor's CPU codegen costs
    ~15 s a layer on a 2-core machine, and a second layer traces the same code."""
    model = tiny_llama(num_hidden_layers=1)
    tk.optimize(model, int4=True, group_size=32, progress=False)
    assert model.config._attn_implementation == "turbokernels"
    ids = torch.randint(0, 128, (2, 9))
    expected = model(ids, use_cache=False).logits
    recorder = _Recorder()
    compiled = torch.compile(model, backend=recorder, fullgraph=True)
    got = compiled(ids, use_cache=False).logits
    assert len(recorder.graphs) == 1 and "int4_mm" in recorder.ops(), recorder.ops()
    # inductor fuses the norms, rotary and MLP pointwise work (other rounding); the int4 kernels are the same
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # While dynamo traces, transformers always builds the causal mask (its skip reads the padding mask's values):
    # integrations/transformers.py checks it in the graph and runs decode_attention over the keys
    assert "decode_attention" in recorder.ops(), recorder.ops()


# ---- GPU: CUDA graphs ----------------------------------------------------------------------------------------------
def _cache_kwarg(model) -> str:
    """transformers >= 5.2x renamed forward's past_key_values to cache (the old name warns)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _greedy_static(model, step, ids, new_tokens: int, cache) -> list:
    """Greedy tokens: the prompt through `model` (eager, as transformers' generate does), then new_tokens - 1 decode
    steps of one token through `step` (the model, or it compiled), all in the StaticCache `cache`."""
    kw = _cache_kwarg(model)
    out = model(ids, use_cache=True, **{kw: cache})
    token = out.logits[:, -1:].argmax(-1)
    tokens = [token.item()]
    for _ in range(new_tokens - 1):
        torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: its memory may be reused
        out = step(token, use_cache=True, **{kw: cache})
        token = out.logits[:, -1:].argmax(-1)  # a new tensor: the graph's output buffer is reused next replay
        tokens.append(token.item())
    return tokens


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_reduce_overhead_static_cache_greedy_tokens_match_eager():
    """torch.compile(mode="reduce-overhead") (inductor + CUDA graph trees) of an int4 Llama with turbokernels
    attention, decoding from a StaticCache: the same greedy tokens as eager, int4_mm in the recorded graph. fp32 (the
    int4 and attention kernels compute in fp32, "ieee" dots) so that only rounding order differs: a random model's
    near-ties cannot flip. (Eager decode runs turbokernels' varlen attention over the static cache's mask, read on
    the host; compiled, decode_attention with lengths and left pads taken from the mask in the graph.)"""
    transformers = pytest.importorskip("transformers")
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code
    torch.manual_seed(0)
    model = tiny_llama().cuda()
    tk.optimize(model, int4=True, group_size=32, progress=False)
    assert model.config._attn_implementation == "turbokernels"
    ids = torch.randint(0, 128, (1, 11), device="cuda")
    new_tokens = 16
    cache = transformers.StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens + 5)
    expected = _greedy_static(model, model, ids, new_tokens, cache)

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    cache.reset()  # the same tensors, zeroed: their static addresses are what the CUDA graph records
    got, code = run_and_get_code(_greedy_static, model, compiled, ids, new_tokens, cache)
    assert got == expected
    assert any("torch.ops.turbokernels.int4_mm" in c for c in code)
    assert any("torch.ops.turbokernels.decode_attention" in c for c in code)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # a second generation replays the recorded graph (cache reset in place, no recompile)
    frames = counters["stats"]["unique_graphs"]
    cache.reset()
    assert _greedy_static(model, compiled, ids, new_tokens, cache) == expected
    assert counters["stats"]["unique_graphs"] == frames


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_decode_step_in_a_cuda_graph(dtype):
    """kv_cache_append + decode_attention captured once in a torch.cuda.CUDAGraph (after one warm-up call, which
    also tunes the kernels: tuning inside a capture is refused) and replayed for several steps, each with new
    inputs copied into the captured buffers and the lengths it returned fed back: every step's output, lengths and
    caches equal the same steps run eagerly (the same kernels on the same values)."""
    torch.manual_seed(0)
    dev = "cuda"
    B, S, Hq, Hkv, D, steps = 3, 256, 8, 2, 64, 5
    k_cache = torch.randn(B, S, Hkv, D, device=dev, dtype=dtype)
    v_cache = torch.randn(B, S, Hkv, D, device=dev, dtype=dtype)
    start = torch.tensor([1, 100, 200], dtype=torch.int32, device=dev)
    news = [tuple(torch.randn(B, 1, h, D, device=dev, dtype=dtype) for h in (Hq, Hkv, Hkv)) for _ in range(steps)]

    def step(q, k_new, v_new, kc, vc, lens):
        lens = tk.kv_cache_append(kc, vc, k_new, v_new, lens)
        return tk.decode_attention(q, kc, vc, lens), lens

    # eager
    kc, vc, lens = k_cache.clone(), v_cache.clone(), start.clone()
    expected = []
    for q, kn, vn in news:
        out, lens = step(q, kn, vn, kc, vc, lens)
        expected.append((out.clone(), lens.clone()))
    expected_caches = (kc, vc)

    # captured: static input buffers; the warm-up writes the same rows the first replay writes again
    kc, vc = k_cache.clone(), v_cache.clone()
    q_s, kn_s, vn_s = (t.clone() for t in news[0])
    lens_s = start.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(q_s, kn_s, vn_s, kc, vc, lens_s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_s, new_lens_s = step(q_s, kn_s, vn_s, kc, vc, lens_s)
    for i, (q, kn, vn) in enumerate(news):
        q_s.copy_(q)
        kn_s.copy_(kn)
        vn_s.copy_(vn)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(new_lens_s, expected[i][1]), i
        torch.testing.assert_close(out_s, expected[i][0], rtol=0, atol=0, msg=f"step {i}")
        lens_s.copy_(new_lens_s)  # the next step appends after this one
    assert torch.equal(kc, expected_caches[0]) and torch.equal(vc, expected_caches[1])

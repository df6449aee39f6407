"""Drop-in uses of the fused attention: scaled_dot_product_attention, nn.MultiheadAttention, HF transformers."""
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import turbokernels as tk
from turbokernels.testing import assert_close, attention_allowance, operand_dtype
from conftest import interpreting, serving_spy

BACKENDS = (["reference"] + (["triton"] if interpreting() or torch.cuda.is_available() else [])
            + (["torch"] if not torch.cuda.is_available() else []))  # torch's fused kernels: CPU tensors


def sdpa64(q, k, v, **kw):
    return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), **kw)


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("causal,hq,hkv,sq,sk", [(False, 4, 4, 17, 33), (True, 4, 2, 40, 40), (False, 4, 1, 1, 97),
                                                (False, 9, 3, 1, 161)])
def test_sdpa_drop_in_matches_torch(backend_name, dtype, causal, hq, hkv, sq, sk):
    q = torch.randn(2, hq, sq, 64).to(dtype)
    k = torch.randn(2, hkv, sk, 64).to(dtype)
    v = torch.randn(2, hkv, sk, 64).to(dtype)
    kw = dict(is_causal=causal, scale=0.3, enable_gqa=hq != hkv)
    with tk.backend(backend_name):
        out = tk.scaled_dot_product_attention(q, k, v, **kw)
    assert out.shape == (2, hq, sq, 64) and out.dtype == dtype
    a_out, _ = attention_allowance(*(t.transpose(1, 2) for t in (q, k, v)), causal=causal, softmax_scale=0.3,
                                   operand_dtype=operand_dtype(backend_name, dtype))
    assert_close(out, sdpa64(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw),
                 allowance=a_out.map(lambda t: t.transpose(1, 2)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU one-call entry")
def test_sdpa_usual_cpu_call_in_one_cxx_call(monkeypatch):
    """scaled_dot_product_attention's usual CPU call runs in one C++ call (turbokernels._C.attention_usual in SDPA's
    layout): the bits of the Python steps it replaces, out in SDPA's layout; is_causal with Sq != Sk (top-left in
    SDPA), float64 and a forced backend are not served there (the Python path: torch's SDPA, the checks)."""
    ops_attention = importlib.import_module("turbokernels.ops.attention")
    real = ops_attention._resolve_fast()
    if not real:
        pytest.skip("the extension's one-call entry")
    served = []
    monkeypatch.setattr(ops_attention, "_fast", serving_spy(real, served))
    torch.manual_seed(0)
    for causal, hq, hkv, sq, sk, dtype in [(True, 4, 2, 9, 9, torch.float32), (False, 2, 2, 5, 17, torch.bfloat16),
                                           (False, 9, 3, 1, 161, torch.float32), (True, 6, 2, 1, 1, torch.float16)]:
        q, k, v = torch.randn(2, hq, sq, 32).to(dtype), *(torch.randn(2, hkv, sk, 32).to(dtype) for _ in range(2))
        kw = dict(is_causal=causal, enable_gqa=hq != hkv)
        served.clear()
        out = tk.scaled_dot_product_attention(q, k, v, **kw)
        assert served == [True] and out.shape == q.shape
        with monkeypatch.context() as m:  # the Python steps: the same kernel, the same bits
            m.setattr(ops_attention, "_fast", False)
            assert torch.equal(tk.scaled_dot_product_attention(q, k, v, **kw), out)
    q, k = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 7, 16)
    for args, kw in (((q, k, k), dict(is_causal=True)), ((q.double(), k.double(), k.double()), {})):
        served.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = tk.scaled_dot_product_attention(*args, **kw)
        assert served == [False]
        torch.testing.assert_close(out, F.scaled_dot_product_attention(*args, **kw))
    served.clear()
    with tk.backend("torch"):
        tk.scaled_dot_product_attention(q, k, k)
    assert served == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_one_query_gqa_runs_grouped_rows(monkeypatch, dtype):
    """One query row under GQA (a decode step over the whole cache) on the torch backend: the query heads of a kv
    head go to the kernel as rows of that head (one C++ call, not the per-head path), through the SDPA drop-in and
    transformers' attention interface; within the allowance of the float64 answer, a NaN query row NaN in its own
    head only."""
    ta = importlib.import_module("turbokernels.ops._torch_attention")
    from turbokernels import _ext
    from turbokernels.integrations import transformers as tkt
    if torch.cuda.is_available() or not _ext.available() or getattr(_ext.C, "torch_attention_fwd", None) is None:
        pytest.skip("needs the CPU extension")
    q = torch.randn(2, 9, 1, 64).to(dtype)
    q[1, 4, 0, 7] = float("nan")
    k, v = (torch.randn(2, 3, 161, 64).to(dtype) for _ in range(2))
    golden = sdpa64(q, k, v, scale=0.125, enable_gqa=True)
    a_out, _ = attention_allowance(*(t.transpose(1, 2) for t in (q, k, v)), softmax_scale=0.125,
                                   operand_dtype=operand_dtype("torch", dtype))
    real_run = ta._run
    monkeypatch.setattr(ta, "_run", lambda *a: pytest.fail("the per-head path ran"))

    class Module(nn.Module):
        is_causal = True

    with torch.no_grad(), tk.backend("torch"):
        # (SDPA's is_causal with one query is torch's top-left rule: key 0 only, a documented fallback, not here)
        outs = [tk.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True),
                tkt.attention_forward(Module(), q, k, v, None, scaling=0.125)[0].transpose(1, 2)]
    monkeypatch.setattr(ta, "_run", real_run)
    nan = golden.isnan()
    assert nan.any() and nan[1, 4].all() and nan.sum() == 64
    for out in outs:
        assert out.shape == q.shape and out.dtype == dtype and (out.isnan() == nan).all()
        assert_close(out.masked_fill(nan, 0), golden.masked_fill(nan, 0),
                     F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True).masked_fill(nan, 0),
                     allowance=a_out.map(lambda t: t.transpose(1, 2).masked_fill(nan, 0)))


def test_sdpa_unfusable_calls_are_torchs_answer_with_one_note(monkeypatch):
    from turbokernels.integrations import sdpa as sdpa_module
    monkeypatch.setattr(sdpa_module, "_noted", set())  # a fresh once-per-process record: the count below is exact
    q, k, v = (torch.randn(1, 2, 8, 32) for _ in range(3))
    mask = torch.rand(8, 8) > 0.3
    k5, v5 = torch.randn(1, 2, 5, 32), torch.randn(1, 2, 5, 32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(tk.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            torch.testing.assert_close(tk.scaled_dot_product_attention(q, k5, v5, is_causal=True),
                                       F.scaled_dot_product_attention(q, k5, v5, is_causal=True))
    notes = [str(c.message) for c in caught if "turbokernels.scaled_dot_product_attention" in str(c.message)]
    # exactly 2: two distinct fallback reasons (an attn_mask; is_causal with seqlen_q != seqlen_k), each noted once
    # although each was called twice (<= 2 would pass with no note at all, or with one reason never noted)
    assert len(notes) == 2, notes
    assert sum("attn_mask is not fused" in n for n in notes) == 1, notes
    assert sum("is_causal with seqlen_q != seqlen_k" in n for n in notes) == 1, notes
    assert all("torch.nn.functional.scaled_dot_product_attention" in n for n in notes)
    with pytest.raises(ValueError, match="enable_gqa"):
        tk.scaled_dot_product_attention(q, torch.randn(1, 1, 8, 32), torch.randn(1, 1, 8, 32))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("kdim", [None, 24])
def test_multihead_attention_same_outputs(batch_first, kdim):
    torch_mha = nn.MultiheadAttention(64, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    ours = tk.nn.MultiheadAttention.from_module(torch_mha)
    L, S, B = 9, 13, 2
    shape = (lambda n, e: (B, n, e)) if batch_first else (lambda n, e: (n, B, e))
    q = torch.randn(shape(L, 64))
    kv = torch.randn(shape(S, kdim or 64))
    with torch.no_grad():
        expected, _ = torch_mha(q, kv, kv, need_weights=False)
        out, weights = ours(q, kv, kv, need_weights=False)
    assert weights is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # the state dict is torch's own
    assert ours.state_dict().keys() == torch_mha.state_dict().keys()


def test_multihead_attention_causal_and_fallbacks(monkeypatch):
    from turbokernels.nn import multihead_attention as mha_module
    monkeypatch.setattr(mha_module, "_noted", set())  # the notes below do not depend on which tests ran before
    torch_mha = nn.MultiheadAttention(32, 2, batch_first=True).eval()
    ours = tk.nn.MultiheadAttention.from_module(torch_mha)
    x = torch.randn(2, 11, 32)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(11)
    with torch.no_grad():
        expected, _ = torch_mha(x, x, x, attn_mask=causal_mask, is_causal=True, need_weights=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out, _ = ours(x, x, x, attn_mask=causal_mask, is_causal=True, need_weights=False)
        assert not [c for c in caught if "turbokernels.nn.MultiheadAttention" in str(c.message)]  # fused: no note
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        pad = torch.zeros(2, 11, dtype=torch.bool)
        pad[1, 7:] = True
        with pytest.warns(UserWarning, match="key_padding_mask"):
            out_p, _ = ours(x, x, x, key_padding_mask=pad, need_weights=False)
        torch.testing.assert_close(out_p, torch_mha(x, x, x, key_padding_mask=pad, need_weights=False)[0])
        out_w, w = ours(x, x, x)  # need_weights=True is torch's default: torch computes it
        torch.testing.assert_close(w, torch_mha(x, x, x)[1])
    with pytest.raises(TypeError, match="from_module"):
        tk.nn.MultiheadAttention.from_module(nn.Linear(3, 3))


# ---- Hugging Face transformers -------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def tiny_llama(attn):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_hf_llama_greedy_generation_matches_sdpa(backend_name):
    from turbokernels.integrations import transformers as tkt
    name = tkt.register()
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = tiny_llama("sdpa").generate(ids, max_new_tokens=8, do_sample=False)
        model = tiny_llama("sdpa")
        model.set_attn_implementation(name)
        with tk.backend(backend_name):
            ours = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, ref)


@pytest.mark.gpu
def test_hf_decode_steps_run_the_decode_kernel_on_gpu(monkeypatch):
    """On a GPU every one-token step with transformers' own cache (no mask) is one decode_attention call per layer
    (the split-KV kernel), and 16 greedy tokens are sdpa's (fp32: no near-tie flips)."""
    from turbokernels.integrations import transformers as tkt
    name = tkt.register()
    ids = torch.randint(0, 256, (2, 12), device="cuda")
    calls = []
    real = tkt.decode_attention
    monkeypatch.setattr(tkt, "decode_attention", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    with torch.no_grad():
        ref = tiny_llama("sdpa").cuda().generate(ids, max_new_tokens=16, do_sample=False)
        model = tiny_llama("sdpa").cuda()
        model.set_attn_implementation(name)
        ours = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, ref)
    assert calls == [1] * (15 * 2)


def test_hf_padding_mask_is_not_dropped():
    """With left padding the mask must reach the attention (transformers drops it without a mask function)."""
    from turbokernels.integrations import transformers as tkt
    name = tkt.register()
    ids = torch.randint(0, 256, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref = tiny_llama("sdpa")(ids, attention_mask=mask).logits
        model = tiny_llama("sdpa")
        model.set_attn_implementation(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ours = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[:, :][mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)


def _sliding(family: str, attn: str):
    """A tiny random model of a sliding-window family, window 5 (shorter than the tests' sequences)."""
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, sliding_window=5, attn_implementation=attn)
    if family == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common)).eval()
    if family == "qwen2":  # layer 0 slides, layer 1 is full
        cfg = transformers.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1,
                                       layer_types=["sliding_attention", "full_attention"])
        return transformers.Qwen2ForCausalLM(cfg).eval()
    cfg = transformers.Gemma2Config(**common, head_dim=16, attn_logit_softcapping=30.0,  # sliding, full; softcap
                                    final_logit_softcapping=None, query_pre_attn_scalar=16)
    return transformers.Gemma2ForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2"])
def test_hf_sliding_window_runs_fused_and_matches_sdpa(family, monkeypatch):
    """The window reaches the kernel (Mistral, Qwen2's per-layer pattern, Gemma-2 with its softcap too): logits of a
    13-token prompt and 12 greedy tokens after it as sdpa's, and no call goes to the sdpa fallback."""
    from transformers.integrations import sdpa_attention
    from turbokernels.integrations import transformers as tkt
    name = tkt.register()
    ids = torch.randint(0, 256, (2, 13))
    with torch.no_grad():
        base = "sdpa" if family != "gemma2" else "eager"  # transformers refuses sdpa for Gemma-2 (its softcap)
        ref_model = _sliding(family, base)
        ref = ref_model(ids).logits
        ref_tokens = ref_model.generate(ids, max_new_tokens=12, do_sample=False)
        model = _sliding(family, base)
        model.set_attn_implementation(name)
        fallback = []
        real = sdpa_attention.sdpa_attention_forward
        monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward",
                            lambda *a, **k: fallback.append(1) or real(*a, **k))
        ours = model(ids).logits
        tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert fallback == []
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, ref_tokens)


def test_mask_plan_recognizes_only_exact_patterns():
    """_mask_plan takes a mask only when the unpadded varlen call computes exactly it: a causal window (dense), left
    and right padding with or without the window, bidirectional padding; not a hole, another window, a float mask."""
    from turbokernels.integrations.transformers import _mask_plan
    q, k = torch.empty(2, 4, 3, 8), torch.empty(2, 2, 9, 8)
    i, j = torch.arange(6, 9)[:, None], torch.arange(9)[None, :]
    exact = ((j <= i) & (j > i - 4)).expand(2, 1, 3, 9).clone()
    plan = _mask_plan(exact, q, k, True, 3)
    assert plan is not None and plan.q_idx is None and plan.window_left == 3  # dense: nothing padded
    assert _mask_plan(exact[:1], q, k, True, 3) is not None  # one row broadcast over the batch
    assert _mask_plan(exact, q, k, True, 4) is None  # another window
    assert _mask_plan(exact, q, k, True, -1) is None  # no window
    holed = exact.clone()
    holed[1, :, :, 6] = False  # a key masked inside the window: not expressible unpadded
    assert _mask_plan(holed, q, k, True, 3) is None
    assert _mask_plan(exact.float(), q, k, True, 3) is None
    causal = (j <= i).expand(2, 1, 3, 9).clone()
    left = causal.clone()
    left[1, :, :, :7] = False  # row 1: 7 pads on the left; its first query attends nothing
    plan = _mask_plan(left, q, k, True, -1)
    assert plan.cu_q.tolist() == [0, 3, 5] and plan.cu_k.tolist() == [0, 9, 11]
    assert plan.q_idx.tolist() == [0, 1, 2, 4, 5] and plan.k_idx.tolist() == list(range(9)) + [16, 17]
    right = causal.clone()
    right[1, :, :, 8] = False  # row 1: its last token is a pad on the right; as a query it still attends keys 0-7
    plan = _mask_plan(right, q, k, True, -1)
    assert plan.cu_q.tolist() == [0, 3, 5] and plan.cu_k.tolist() == [0, 9, 17]  # that query is dropped
    static = torch.zeros(2, 1, 3, 9, dtype=torch.bool)  # queries at positions 2-4 of a 9-slot static cache
    static[:, :, :, :5] = (torch.arange(5)[None, :] <= torch.arange(2, 5)[:, None])
    plan = _mask_plan(static, q, k, True, -1)
    assert plan.cu_q.tolist() == [0, 3, 6] and plan.cu_k.tolist() == [0, 5, 10]  # the unwritten slots dropped
    static[1, :, :, 0] = False  # and a left pad in row 1
    assert _mask_plan(static, q, k, True, -1).cu_k.tolist() == [0, 5, 9]
    bidirectional = torch.ones(2, 1, 3, 9, dtype=torch.bool)
    bidirectional[0, :, :, 7:] = False
    plan = _mask_plan(bidirectional, q, k, False, -1)
    assert plan.cu_q.tolist() == [0, 3, 6] and plan.cu_k.tolist() == [0, 7, 16]
    assert _mask_plan(bidirectional, q, k, True, -1) is None  # a causal module with a full mask: not its pattern
    left[0, :, 0, 0] = False  # changed in place: read again (the plan is cached on the mask, with its version)
    assert _mask_plan(left, q, k, True, -1) is None


def _padded_model(family: str, attn: str):
    if family == "llama":
        return tiny_llama(attn)
    return _sliding(family, attn)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_hf_padded_batch_runs_fused_and_matches_sdpa(family, monkeypatch):
    """A batch with left padding (one row padded past the sliding window of 5) runs the varlen kernel on every call,
    prefill and decode: logits at the real positions and 10 greedy tokens as sdpa's (eager for Gemma-2), no call to
    the sdpa fallback. Right padding: logits at the real positions."""
    from transformers.integrations import sdpa_attention
    from turbokernels.integrations import transformers as tkt
    name = tkt.register()
    ids = torch.randint(1, 256, (3, 11))
    left = torch.ones(3, 11, dtype=torch.long)
    left[1, :4] = 0
    left[2, :8] = 0
    right = torch.ones(3, 11, dtype=torch.long)
    right[0, 9:] = 0
    right[2, 3:] = 0
    base = "eager" if family == "gemma2" else "sdpa"
    ref_model = _padded_model(family, base)
    model = _padded_model(family, base)
    model.set_attn_implementation(name)
    fallback, varlen = [], []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: fallback.append(1) or real(*a, **k))
    real_attention = tkt.attention
    monkeypatch.setattr(tkt, "attention", lambda *a, **k: varlen.append(k.get("cu_seqlens_q") is not None)
                        or real_attention(*a, **k))
    with torch.no_grad():
        for mask in (left, right):
            ref = ref_model(ids, attention_mask=mask).logits
            ours = model(ids, attention_mask=mask).logits
            torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)
        kw = dict(attention_mask=left, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids, **kw), ref_model.generate(ids, **kw))
    # (a sliding window that has moved past every pad makes the mask dense again: those calls are dense)
    assert fallback == [] and True in varlen and (family != "llama" or all(varlen))


def test_hf_bert_padded_batch_runs_fused():
    """Bidirectional padding (BERT): the unpadded varlen call, hidden states at the real tokens as sdpa's."""
    from transformers.integrations import sdpa_attention
    from turbokernels.integrations import transformers as tkt
    name = tkt.register()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, attn_implementation="sdpa")
    ref_model = transformers.BertModel(cfg).eval()
    model = transformers.BertModel(cfg).eval()
    model.load_state_dict(ref_model.state_dict())
    model.set_attn_implementation(name)
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would note it
        ours = model(ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        ref = ref_model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_hf_masks_under_torch_compile_run_fused_and_checked(family, monkeypatch):
    """Under torch.compile transformers always builds the mask and its values cannot be read while tracing: a
    left-padded batch (and Mistral's window of 5) runs decode_attention with lengths and left pads computed in the
    graph (logits at the real tokens as eager's, no sdpa fallback); a mask that is not a causal run of keys (here
    bidirectional) fails the in-graph assert instead of being dropped."""
    from transformers.integrations import sdpa_attention
    from turbokernels.integrations import transformers as tkt
    name = tkt.register()
    model = _padded_model(family, "sdpa")
    model.set_attn_implementation(name)
    ids = torch.randint(1, 256, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    fallback = []
    real = sdpa_attention.sdpa_attention_forward
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", lambda *a, **k: fallback.append(1) or real(*a, **k))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
        assert fallback == []
        with pytest.raises(RuntimeError, match="under torch.compile the attention mask must be causal"):
            compiled(ids, attention_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool), use_cache=False)
    torch._dynamo.reset()

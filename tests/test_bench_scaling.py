"""bench/scaling.py (docs/scaling.md): the model shapes give the published parameter counts, and the table's columns
are the arithmetic the doc says they are."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import scaling  # noqa: E402


def test_parameter_counts_match_the_models():
    counts = {s.name: s.total_params() for s in scaling.SHAPES}
    # Llama-3-8B 8.03 B, Llama-3-70B 70.55 B, Llama-3.1-405B 405.85 B (their configs; untied embeddings)
    assert abs(counts["Llama-3-8B"] / 8.030e9 - 1) < 1e-3
    assert abs(counts["Llama-3-70B"] / 70.554e9 - 1) < 1e-3
    assert abs(counts["Llama-3.1-405B"] / 405.85e9 - 1) < 1e-3


def test_columns_follow_the_stated_arithmetic():
    rows = list(scaling.rows(context=8192, hbm_tbs=3.35, allreduce_us=8.0, link_gbs=450.0))
    assert len(rows) == 3 * 2 * 4
    for r in rows:
        assert abs(r["hbm_ms"] - r["streamed_gb"] * 1e9 / 3.35e12 * 1e3) < 1e-9
        assert r["token_ms"] == r["hbm_ms"] + r["allreduce_ms"]
        assert (r["allreduce_calls"] == 0) == (r["tp"] == 1)
    by = {(r["model"], r["weights"], r["tp"]): r for r in rows}
    # int4 g128 streams 0.53125 / 2 of bf16's linear bytes; doubling TP halves a rank's weights
    b, i = by[("Llama-3-70B", "bf16", 1)], by[("Llama-3-70B", "int4 g128", 1)]
    assert 0.27 < i["resident_gb"] / b["resident_gb"] < 0.30
    assert abs(by[("Llama-3-70B", "int4 g128", 2)]["resident_gb"] * 2 - i["resident_gb"]) < 1e-6
    # the doc's claims: 70B int4 fits one 80 GB GPU, 405B int4 does not fit one 141 GB H200
    assert i["resident_gb"] < 80 and by[("Llama-3.1-405B", "int4 g128", 1)]["resident_gb"] > 141
    assert "| Llama-3-8B | int4 g128 | 2 |" in scaling.markdown(8192, 3.35, 8.0, 450.0)

"""The GPU benchmarks' columns for our forced backends and torch's SDPA backends (bench/int4.py and
bench/attention_decode.py): a contender that cannot run a case is an empty cell with its reason, never a crash.
Run here on CPU tensors (the GPU row functions take any device; Triton under the interpreter), with each timing
replaced by one call, so the code paths run without a GPU; no time is asserted."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import turbokernels as tk
from turbokernels.bench import attention_decode, common, int4

ENV = {"device": "test", "torch": torch.__version__, "triton": "", "date": ""}
ROOF = {"peak_bytes_per_s": 1e10, "peak_flops": 1e11}
CPU = torch.device("cpu")


@pytest.fixture
def one_call_timer(monkeypatch):
    """median_ms -> one call of fn, 2.0 ms: the rows' arithmetic is checkable and the interpreter runs each once."""
    calls = []

    def timer(fn, device, **kwargs):
        fn()
        calls.append(device)
        return 2.0

    for module in (common, int4, attention_decode):
        monkeypatch.setattr(module, "median_ms", timer)
    return calls


def test_optional_ms_turns_refusals_into_empty_cells(one_call_timer):
    x = torch.randn(2, 64)
    w = tk.quantize_int4(torch.randn(8, 64), group_size=32)
    ms, why = common.optional_ms(lambda: tk.int4_linear(x, w), CPU, lambda: tk.backend("cuda"))
    assert ms == "" and "turbokernels.int4_mm" in why      # no cuda backend, or one that needs CUDA tensors

    def missing_kernel():
        raise RuntimeError("No such operator turbokernels_C::decode_attention_cuda")

    def sdpa_refuses():
        raise RuntimeError("No available kernel. Aborting execution.")

    def broken():
        raise ValueError("bad launch\nsecond line")

    assert common.optional_ms(missing_kernel, CPU) == ("", "turbokernels._C lacks the kernel (No such operator "
                                                           "turbokernels_C::decode_attention_cuda)")
    assert common.optional_ms(sdpa_refuses, CPU) == ("", "this SDPA backend does not take the case")
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # torch's own refusal
        q = torch.randn(1, 2, 4, 8)
        ms, why = common.optional_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), CPU)
    assert (ms, why) == ("", "this SDPA backend does not take the case")
    assert common.optional_ms(broken, CPU) == ("", "error: ValueError: bad launch")
    assert one_call_timer == []                              # nothing that raised was timed
    assert common.optional_ms(lambda: tk.int4_linear(x, w), CPU, lambda: tk.backend("reference")) == (2.0, "")
    assert one_call_timer == [CPU]
    with pytest.raises(KeyboardInterrupt):                   # only Exceptions become cells
        common.optional_ms(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), CPU)


def test_ratio_and_rounded_keep_empty_cells():
    assert common.ratio(3.0, 2.0) == 1.5 and common.ratio("", 2.0) == "" and common.ratio(3.0, "") == ""
    assert common.rounded(1.234567, 2) == 1.23 and common.rounded("", 2) == ""


def test_int4_gpu_row_has_a_cell_per_backend(one_call_timer):
    dense = torch.randn(32, 128) * 0.02
    weight = tk.quantize_int4(dense, group_size=int4.GROUP_SIZE)
    row = int4.gpu_row(ENV, ROOF, CPU, torch.float32, 3, weight, lambda: weight, lambda: dense)
    assert row["triton_ms"] == 2.0 and row["triton_note"] == ""      # Triton runs here under the interpreter
    assert row["cuda_ms"] == "" and "turbokernels.int4_mm" in row["cuda_note"]
    assert row["cuda_vs_cublas"] == "" and row["cuda_vs_triton"] == "" and row["cuda_bandwidth_pct"] == ""
    assert row["triton_vs_cublas"] == 1.0 and row["speedup"] == 1.0
    assert (row["K"], row["N"], row["M"]) == (128, 32, 3)


def test_int4_gpu_row_ratios_when_cuda_runs(one_call_timer, monkeypatch):
    """With a cuda column (a stand-in for the C++ kernel: the forced backend's call faked), the ratios are
    cuBLAS / cuda and triton / cuda."""
    times = {"triton": 3.0, "cuda": 1.5}

    def optional_ms(fn, device, context=None, first_calls=1):
        with context():
            return times[tk.backends.forced_backend()], ""

    monkeypatch.setattr(int4, "optional_ms", optional_ms)
    dense = torch.randn(32, 128) * 0.02
    weight = tk.quantize_int4(dense, group_size=int4.GROUP_SIZE)
    row = int4.gpu_row(ENV, ROOF, CPU, torch.float32, 1, weight, lambda: weight, lambda: dense)
    assert row["cuda_vs_cublas"] == round(2.0 / 1.5, 3) and row["cuda_vs_triton"] == 2.0
    assert row["triton_vs_cublas"] == round(2.0 / 3.0, 3)


@pytest.mark.parametrize("new_tokens", [1, 2])
def test_decode_gpu_rows_have_a_cell_per_contender(one_call_timer, new_tokens):
    rows = attention_decode.gpu_rows(ENV, ROOF, CPU, torch.float32, 1, attention_decode.PAGE_SIZE, new_tokens)
    assert [r["layout"] for r in rows] == ["contig", "paged"]
    for row in rows:
        assert row["triton_ms"] == 2.0                      # our Triton decode kernel, interpreted
        assert row["cuda_ms"] == "" and "cuda: turbokernels.decode_attention" in row["notes"]
        assert row["sdpa_cudnn_ms"] == ""                   # cuDNN refuses CPU tensors: a refusal, not an error
        assert "sdpa_cudnn: this SDPA backend does not take the case" in row["notes"]
        assert row["cuda_vs_triton"] == "" and row["cuda_vs_cudnn"] == "" and row["triton_vs_cudnn"] == ""
        flash = row["sdpa_flash_ms"]                         # CPU flash: runs or refuses, never raises
        assert flash == 2.0 or (flash == "" and "sdpa_flash:" in row["notes"])
        assert row["triton_vs_flash"] == (1.0 if flash == 2.0 else "")


def test_gpu_tables_are_written_as_they_go(one_call_timer, monkeypatch, tmp_path):
    """run_gpu's loops on a tiny grid (CPU tensors): every row in the CSV, an empty cell where cuda cannot run."""
    import csv
    for module in (int4, attention_decode):
        monkeypatch.setattr(module, "measured_roofline", lambda device, dtype: ROOF)
        monkeypatch.setattr(module, "environment", lambda device: ENV)
    monkeypatch.setattr(int4, "_cases", lambda quick: [(torch.float32, [(128, 32)], [1, 3])])
    monkeypatch.setattr(attention_decode, "_cases", lambda dev, quick: [(torch.float32, [(1, 64)], 1)])
    assert len(int4.run_gpu(CPU, str(tmp_path), quick=True)) == 2
    assert len(attention_decode.run_gpu(CPU, str(tmp_path), quick=True)) == 2
    for name in ("int4_cpu.csv", "attention_decode_cpu.csv"):
        with open(tmp_path / name) as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2 and all(r["cuda_ms"] == "" and r["triton_ms"] == "2.0" for r in rows)

"""Deliberate bugs the test suite must catch: run by hand, `python tests/mutations.py [name ...]` (`--list`).

Each mutation is one exact text replacement in one source file. The tool copies the package (python/turbokernels,
kernels/ as turbokernels.kernels, bench/ as turbokernels.bench, the built _C) and tests/ into a temporary
directory, applies the mutation there (the working tree is never touched), and runs the named tests against the
copy. A mutation is CAUGHT when those tests fail, MISSED when they pass. `--control` also runs each selection on
the unmutated copy, which must pass (otherwise a catch proves nothing). Results go to stdout as a table; the counts
are recorded in docs/reliability.md.

A mutation of a C++ kernel (path csrc/cpu/<op>.cpp or a header it includes, with `build` naming that .cpp) rebuilds
the copy's turbokernels._C from its C++ sources without CUDA (torch.utils.cpp_extension: the first one a few
minutes, then only the mutated file). A CUDA C++ kernel (csrc/cuda/) is mutated the same way and caught on the CPU
emulator: `build` names its emulated launcher (csrc/emu/<op>.cpp).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    what: str           # the bug, in words
    path: str           # file, relative to the repository root
    old: str            # exact text, must occur exactly once
    new: str
    tests: tuple        # pytest selections (relative to the repository root) that must catch it
    build: str = ""     # C++ mutations: the .cpp that includes the mutated file (csrc/cpu/<op>.cpp, or the emulated CUDA
    #                     kernel's csrc/emu/<op>.cpp): the copy's _C is rebuilt


MUTATIONS = [
    Mutation("tp-rowwise-no-all-reduce", "the DTensor path of a row-parallel packed layer returns its partial "
             "product as the whole output (no reduction)", "python/turbokernels/parallel.py",
             "out = DTensor.from_local(y, mesh, [Partial()], run_check=False)",
             "out = DTensor.from_local(y, mesh, [Replicate()], run_check=False)",
             ("tests/test_parallel.py::test_layouts_local_path_and_dtensor_path_both_orders",)),
    Mutation("tp-rowwise-bias-per-rank", "a row-parallel packed layer adds its bias on every rank before the sum",
             "python/turbokernels/parallel.py",
             "with_bias = bias is not None and self.style == COLWISE",
             "with_bias = bias is not None",
             ("tests/test_parallel.py::test_refusals_name_the_rule_and_change_nothing",)),
    Mutation("tp-act-order-global-numbering", "row-parallel act-order: each rank's permutation keeps the whole "
             "input's numbering", "python/turbokernels/parallel.py",
             "return perm[rank * k_rank:(rank + 1) * k_rank] - rank * k_rank",
             "return perm[rank * k_rank:(rank + 1) * k_rank]",
             ("tests/test_parallel.py::test_refusals_name_the_rule_and_change_nothing",)),
    Mutation("tp-shard-then-optimize-drops-hooks", "optimize() of a sharded model does not carry the parallel "
             "style's input/output hooks over to the packed layer", "python/turbokernels/model.py",
             "            else:\n                _copy_hooks(modules[name], new)\n",
             "            else:\n                pass\n",
             ("tests/test_parallel.py::test_layouts_local_path_and_dtensor_path_both_orders",)),
    Mutation("tp-local-path-no-all-reduce", "the local path of a row-parallel packed layer skips its all_reduce",
             "python/turbokernels/parallel.py",
             "                if mesh.size() > 1:\n                    dist.all_reduce(y, group=self.group)",
             "                pass",
             ("tests/test_parallel.py::test_tp2_matches_one_process_fp32",)),
    Mutation("int4-output-x1.01", "int4_mm Triton kernel scales its bf16/fp16 output by 1.01",
             "kernels/int4_mm.py",
             "tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty)",
             "tl.store(out_ptrs, (acc * 1.01).to(out_ptr.dtype.element_ty)",
             ("tests/test_int4_mm.py::test_int4_linear_matches_golden",)),
    Mutation("int4-splitk-partials-in-input-dtype", "split-K partial sums kept in the activation dtype, not fp32",
             "kernels/_launch.py",
             "out = empty((splits, M, N), device=like.device, dtype=torch.float32)",
             "out = empty((splits, M, N), device=like.device, dtype=like.dtype)",
             ("tests/test_int4_mm.py::test_int4_linear_matches_golden",
              "tests/test_int4_mm.py::test_every_triton_config_is_correct")),
    Mutation("int4-bias-after-rounding", "int4_linear adds the bias after the op's output is rounded (two "
             "roundings; every backend)", "python/turbokernels/ops/int4_mm.py",
             "out = int4_mm(x2, weight.qweight, weight.scales, weight.offsets, weight.effective_group_size, bias)",
             "out = int4_mm(x2, weight.qweight, weight.scales, weight.offsets, weight.effective_group_size, None)"
             " + (0 if bias is None else bias)",
             ("tests/test_int4_mm.py::test_int4_linear_matches_golden",)),
    Mutation("splitk-bias-after-rounding", "split-K: the reduced product is rounded, then the bias added",
             "kernels/_launch.py",
             "    return acc.to(dtype)",
             "    return acc.to(dtype) if bias is None else (acc - bias).to(dtype) + bias.to(dtype)",
             ("tests/test_int4_mm.py::test_every_triton_config_is_correct",)),
    Mutation("sparse24-output-x1.01", "sparse24_mm Triton kernel scales its output by 1.01",
             "kernels/sparse24_mm.py",
             "tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty)",
             "tl.store(out_ptrs, (acc * 1.01).to(out_ptr.dtype.element_ty)",
             ("tests/test_sparse24_mm.py::test_sparse24_linear_matches_golden",)),
    Mutation("sparse24-int4-cpu-second-kept-index", "sparse24_int4_mm C++ kernel: the second kept value of a group "
             "of 4 reads the first one's position from meta (every ISA path)",
             "csrc/cpu/sparse24_int4_mm_simd.h",
             "const VI id = Vec::idx(mt, i);",
             "const VI id = Vec::idx(mt, i & ~1);",
             ("tests/test_sparse24_int4_mm.py::test_cpu_kernel_every_isa_path",),
             build="csrc/cpu/sparse24_int4_mm.cpp"),
    Mutation("int4-cuda-b-register-slot", "int4_mm CUDA kernel: a dequantized pair goes to the wrong B register "
             "(tile and register swapped)", "csrc/cuda/int4_mm.cuh",
             "else b[j >> 1][j & 1] = tk_int4_dequant::pair_half<T>",
             "else b[j & 1][j >> 1] = tk_int4_dequant::pair_half<T>",
             ("tests/test_int4_mm_cuda.py::test_emulated_kernel_matches_golden",),
             build="csrc/emu/int4_mm.cpp"),
    Mutation("int4-cuda-zero-point-offset-twice", "int4_mm CUDA kernel, zero-point mode: the -(M + z) term is "
             "added again after the scale multiply", "csrc/cuda/int4_dequant.cuh",
             "return fma2<T>(q, s2, 0u);", "return fma2<T>(q, s2, neg_mz2);",
             ("tests/test_int4_mm_cuda.py::test_emulated_kernel_matches_golden",),
             build="csrc/emu/int4_mm.cpp"),
    Mutation("int4-cuda-pipeline-wait", "int4_mm CUDA kernel: cp.async.wait_group leaves one stage too many in flight "
             "(computes on a stage before it lands)", "csrc/cuda/int4_mm.cuh",
             "    cp_async_wait<kStages - 2>();", "    cp_async_wait<kStages - 1>();",
             ("tests/test_int4_mm_cuda.py::test_emulated_kernel_matches_golden",),
             build="csrc/emu/int4_mm.cpp"),
    Mutation("int4-cuda-splitk-last-part-skipped", "int4_mm CUDA kernel: the split-K reduction omits the last part",
             "csrc/cuda/split_k.cuh",
             "for (int part = 0; part < splits; ++part)", "for (int part = 0; part < splits - 1; ++part)",
             ("tests/test_int4_mm_cuda.py::test_split_k_parts_are_exact_and_deterministic",),
             build="csrc/emu/int4_mm.cpp"),
    Mutation("int4-cuda-repack-halves-swapped", "int4_mm repack/kernel layout: the two k of a B register pair "
             "swapped (k + 1 in the lower half)", "csrc/cuda/int4_mm_layout.h",
             "  dk = 2 * t + 8 * (reg & 1) + upper;", "  dk = 2 * t + 8 * (reg & 1) + 1 - upper;",
             ("tests/test_int4_mm_cuda.py::test_repacked_nibbles_sit_where_the_isa_b_fragment_wants_them",),
             build="csrc/emu/int4_mm.cpp"),
    Mutation("decode-cuda-v-trans-address", "decode attention CUDA kernel: ldmatrix .trans row addresses of the V tile "
             "swap the key and head-dim halves", "csrc/cuda/decode_attention.cuh",
             "(lane & 7) + ((lane >> 3) & 1) * 8) * S::LD + dp * 16 + (lane >> 4) * 8",
             "(lane & 7) + (lane >> 4) * 8) * S::LD + dp * 16 + ((lane >> 3) & 1) * 8",
             ("tests/test_decode_attention_cuda.py::test_emulated_matches_golden",),
             build="csrc/emu/decode_attention.cpp"),
    Mutation("decode-cuda-no-alpha-rescale", "decode attention CUDA kernel: the running output is not rescaled when "
             "the row max grows", "csrc/cuda/decode_attention.cuh",
             "for (int r = 0; r < 4; ++r) acc[j][r] *= alpha[r >> 1];",
             "for (int r = 0; r < 4; ++r) acc[j][r] *= 1.f;",
             ("tests/test_decode_attention_cuda.py::test_emulated_matches_golden",),
             build="csrc/emu/decode_attention.cpp"),
    Mutation("decode-cuda-window-off-by-one", "decode attention CUDA kernel: the left window drops its first key",
             "csrc/cuda/decode_attention.cuh", "dist <= p.window_left)", "dist < p.window_left)",
             ("tests/test_decode_attention_cuda.py::test_emulated_mask_edges",),
             build="csrc/emu/decode_attention.cpp"),
    Mutation("decode-cuda-combine-drops-last-split", "decode attention CUDA combine: the last split that ran is "
             "left out", "csrc/cuda/decode_attention.cuh",
             "ran = ran < p.splits ? ran : p.splits;", "ran = (ran < p.splits ? ran : p.splits) - (ran > 1 ? 1 : 0);",
             ("tests/test_decode_attention_cuda.py::test_emulated_split_counts",),
             build="csrc/emu/decode_attention.cpp"),
    Mutation("sparse24-int4-cuda-scale-row", "int4 + 2:4 CUDA kernel: a register's scale taken from the wrong "
             "fragment row (g + 8 for g)", "csrc/cuda/sparse24_int4_mm.cuh",
             "else a[r] = tk_int4_dequant::pair_half<T>(word, r, sc[r & 1], of[r & 1]);",
             "else a[r] = tk_int4_dequant::pair_half<T>(word, r, sc[r >> 1], of[r >> 1]);",
             ("tests/test_sparse24_int4_mm_cuda.py::test_emulated_kernel_matches_golden",),
             build="csrc/emu/sparse24_int4_mm.cpp"),
    Mutation("sparse24-int4-cuda-meta-thread-pair", "int4 + 2:4 CUDA kernel: both threads of a pair supply the "
             "metadata of the first k16 half", "csrc/cuda/sparse24_int4_mm.cuh",
             "const uint32_t lo = lds(sm + row * S::MS + step * 2 + (t & 1));",
             "const uint32_t lo = lds(sm + row * S::MS + step * 2);",
             ("tests/test_sparse24_int4_mm_cuda.py::test_emulated_kernel_matches_golden",),
             build="csrc/emu/sparse24_int4_mm.cpp"),
    Mutation("sparse24-int4-cuda-group-in-dense-k", "int4 + 2:4 layout: groups counted in dense k instead of kept "
             "values", "csrc/cuda/sparse24_int4_mm_layout.h",
             "static_cast<long long>(ks) * 16 / group_size", "static_cast<long long>(ks) * 32 / group_size",
             ("tests/test_sparse24_int4_mm_cuda.py::test_emulated_kernel_matches_golden",),
             build="csrc/emu/sparse24_int4_mm.cpp"),
    Mutation("attention-fwd-causal-edge-hi", "forward: the last key block of a tile's causal/right window edge "
             "ends one key early (hidden unless that key starts a block)",
             "kernels/attention_fwd.py",
             "hi = tl.maximum(tl.minimum(sk, m_last + shift + window_right + 1), 0)",
             "hi = tl.maximum(tl.minimum(sk, m_last + shift + window_right), 0)",
             ("tests/test_attention.py::test_mask_edges",)),
    Mutation("attention-fwd-full-block-edge", "forward: a key block one past the causal edge is treated as "
             "needing no mask (visible only when the edge sits on a block boundary)",
             "kernels/attention_fwd.py",
             "full_hi = tl.maximum(tl.minimum(m0 + shift + window_right + 1, sk), 0) // BLOCK_N * BLOCK_N",
             "full_hi = tl.maximum(tl.minimum(m0 + shift + window_right + 2, sk), 0) // BLOCK_N * BLOCK_N",
             ("tests/test_attention.py::test_mask_edges",)),
    Mutation("attention-fwd-left-window-edge", "forward: the first unmasked block starts one key before the left "
             "window edge allows",
             "kernels/attention_fwd.py",
             "full_lo = tl.minimum(tl.cdiv(tl.maximum(m_last + shift - window_left, 0), BLOCK_N) * BLOCK_N, hi)",
             "full_lo = tl.minimum(tl.cdiv(tl.maximum(m_last + shift - window_left - 1, 0), BLOCK_N) * BLOCK_N, hi)",
             ("tests/test_attention.py::test_mask_edges",)),
    Mutation("attention-fwd-mask-off-by-one", "forward: the in-block causal mask lets each row see one key past "
             "its diagonal",
             "kernels/attention_fwd.py",
             "ok = ok & (rel <= window_right)",
             "ok = ok & (rel <= window_right + 1)",
             ("tests/test_attention.py::test_forward_matches_golden",)),
    Mutation("attention-bwd-dkdv-last-query-block", "backward dK/dV: the band of query blocks that see a key block "
             "ends one row early", "kernels/attention_bwd.py",
             "m_hi = tl.minimum(n0 + BLOCK_N + window_left - (sk - sq), sq)",
             "m_hi = tl.minimum(n0 + BLOCK_N + window_left - (sk - sq) - 1, sq)",
             ("tests/test_attention_bwd.py::test_mask_edges",)),
    Mutation("attention-bwd-dkdv-first-query-block", "backward dK/dV: the band of query blocks starts one row late",
             "kernels/attention_bwd.py",
             "m_lo = tl.maximum(n0 - (sk - sq) - window_right, 0)",
             "m_lo = tl.maximum(n0 - (sk - sq) - window_right + 1, 0)",
             ("tests/test_attention_bwd.py::test_mask_edges",)),
    Mutation("attention-bwd-dq-last-key-block", "backward dQ kernel: the key blocks of a query block end one key "
             "early", "kernels/attention_bwd.py",
             "n_hi = tl.minimum(m0 + BLOCK_M + (sk - sq) + window_right, sk)",
             "n_hi = tl.minimum(m0 + BLOCK_M + (sk - sq) + window_right - 1, sk)",
             ("tests/test_attention_bwd.py::test_mask_edges",)),
    Mutation("attention-bwd-dq-first-key-block", "backward dQ kernel: the key blocks start one key late",
             "kernels/attention_bwd.py",
             "n_lo = tl.maximum(m0 + (sk - sq) - window_left, 0)",
             "n_lo = tl.maximum(m0 + (sk - sq) - window_left + 1, 0)",
             ("tests/test_attention_bwd.py::test_mask_edges",)),
    Mutation("decode-window-first-block", "decode: the first key block inside the left window starts one key late",
             "kernels/attention_decode.py",
             "lo = tl.maximum(start, ((seqlen - T - window_left) // BLOCK_N) * BLOCK_N)",
             "lo = tl.maximum(start, ((seqlen - T - window_left + 1) // BLOCK_N) * BLOCK_N)",
             ("tests/test_decode_attention.py::test_mask_edges",)),
]


def _copy_tree(dst: str) -> None:
    """The package as an installed tree (turbokernels/, turbokernels/kernels, turbokernels/bench) + tests/."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(os.path.join(ROOT, "python", "turbokernels"), os.path.join(dst, "turbokernels"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(dst, "turbokernels", "kernels"), ignore=ignore)
    shutil.copytree(os.path.join(ROOT, "bench"), os.path.join(dst, "turbokernels", "bench"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "out", "results"))
    shutil.copytree(os.path.join(ROOT, "tests"), os.path.join(dst, "tests"), ignore=ignore)
    shutil.copy(os.path.join(ROOT, "pyproject.toml"), dst)
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(dst, "csrc"), ignore=ignore)  # C++ mutations


def _source_path(dst: str, path: str) -> str:
    if path.startswith("kernels/"):
        return os.path.join(dst, "turbokernels", path)
    if path.startswith("python/"):
        return os.path.join(dst, path[len("python/"):])
    if path.startswith("bench/"):
        return os.path.join(dst, "turbokernels", path)
    return os.path.join(dst, path)


def _build_cpp(dst: str, kernel: str) -> None:
    """Rebuild the copy's turbokernels._C from its C++ sources (csrc/*.cpp, csrc/cpu/*.cpp, csrc/emu/*.cpp: what
    setup.py compiles without CUDA; ops.cpp's one-call entries need the CPU kernels beside `kernel`) with setup.py's
    flags, in place of the built one. The objects stay in the copy's build-ext/ for the run: ninja recompiles only
    the mutated file (and, next time, its restored original)."""
    import glob
    build = os.path.join(dst, "build-ext")
    os.makedirs(build, exist_ok=True)
    csrc = os.path.join(dst, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp"))
                     + glob.glob(os.path.join(csrc, "emu", "*.cpp")))
    assert os.path.join(dst, kernel.split()[0]) in sources, f"{kernel} is not among the C++ sources"
    # load() names objects by the source's base name (cpu/int4_mm.cpp and emu/int4_mm.cpp would collide): compile
    # one-line wrappers with unique names that #include each source (its own quote includes still resolve)
    wrappers = []
    for src in sources:
        name = os.path.relpath(src, csrc).replace(os.sep, "_")
        wrapper = os.path.join(build, "src_" + name)
        text = f'#include "{src}"\n'
        if not os.path.exists(wrapper) or open(wrapper).read() != text:
            open(wrapper, "w").write(text)
        wrappers.append(wrapper)
    code = ("import sys; from torch.utils.cpp_extension import load; "
            "load(name='_C', sources=sys.argv[1:-2], extra_include_paths=[sys.argv[-2]], build_directory=sys.argv[-1], "
            "extra_cflags=['-O3', '-fopenmp', '-g0'], extra_ldflags=['-fopenmp'])")
    proc = subprocess.run([sys.executable, "-c", code, *wrappers, csrc, build], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building {kernel} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (built,) = glob.glob(os.path.join(build, "_C*.so"))
    (installed,) = glob.glob(os.path.join(dst, "turbokernels", "_C*.so"))
    shutil.copy(built, installed)


def _run(dst: str, tests) -> tuple[int, str, float]:
    """(pytest's exit code: 0 passed, 1 some test failed, other: collection/usage error), last line, seconds."""
    env = dict(os.environ, PYTHONPATH=dst, TURBOKERNELS_AUTOTUNE="0")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.time()
    proc = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return proc.returncode, (lines[-1] if lines else proc.stderr[-300:]), time.time() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--control", action="store_true", help="also run each selection without the mutation")
    parser.add_argument("--markdown", action="store_true", help="end with the results as a markdown table")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.names or m.name in args.names]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:<40} {m.path:<28} {m.what}")
        return 0
    bad = 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _copy_tree(tmp)
        check = subprocess.run([sys.executable, "-c", "import turbokernels; print(turbokernels.__file__)"],
                               env=dict(os.environ, PYTHONPATH=tmp), capture_output=True, text=True, cwd=tmp)
        assert check.stdout.startswith(tmp), f"the copy is not the package imported: {check.stdout}{check.stderr}"
        for m in chosen:
            target = _source_path(tmp, m.path)
            original = open(target).read()
            assert original.count(m.old) == 1, f"{m.name}: the text occurs {original.count(m.old)}x in {m.path}"
            if args.control:
                rc, tail, secs = _run(tmp, m.tests)
                print(f"control {m.name}: {'pass' if rc == 0 else 'FAILS UNMUTATED'} ({secs:.0f} s) {tail}", flush=True)
                bad += rc != 0
            open(target, "w").write(original.replace(m.old, m.new))
            saved_c = None
            try:
                if m.build:
                    import glob
                    (so,) = glob.glob(os.path.join(tmp, "turbokernels", "_C*.so"))
                    saved_c = (so, open(so, "rb").read())
                    _build_cpp(tmp, m.build)
                rc, tail, secs = _run(tmp, m.tests)
            finally:
                open(target, "w").write(original)
                if saved_c is not None:
                    open(saved_c[0], "wb").write(saved_c[1])
            verdict = {0: "MISSED", 1: "caught"}.get(rc, f"ERROR rc={rc}")
            bad += rc != 1
            print(f"{verdict} {m.name:<40} {secs:6.0f} s  {tail}", flush=True)
            tests = ", ".join(f"`{t.split('::')[-1]}`" for t in m.tests)
            rows.append(f"| `{m.name}` | `{m.path}` | {m.what} | {tests} | {verdict}: {tail} |")
    print(f"{len(chosen)} mutations, {bad} not caught or errors")
    if args.markdown:
        print("| mutation | file | bug | tests | result |\n|---|---|---|---|---|\n" + "\n".join(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

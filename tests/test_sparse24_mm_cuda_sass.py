"""The CUDA C++ 2:4 kernel (csrc/cuda/sparse24_mm.cu).

Static, in CI without a GPU: dump the SASS and the resource usage of the built turbokernels._C with the cuobjdump
that ships with triton, and check, for every architecture the .so holds code for, that it has the sparse24 GEMM
kernels (fp16, bf16), that they really run on sparse tensor cores, and that they use no local memory (no spills).
Where this environment builds the CUDA sources (setup.py's rule: a CUDA torch and nvcc, TURBOKERNELS_CUDA not 0), a
.so without device code fails instead of skipping, and so does one that lacks an architecture TORCH_CUDA_ARCH_LIST
names, where it is set (the Makefile rebuilds when it changes). CI builds one architecture (.ci/run), a plain
install the four of setup.py's default.

GPU (`-m gpu`, run by bench/gpu_check.sh): the forced "cuda" backend against a float64 golden result.
"""
import importlib.util
import os
import re
import shutil
import subprocess

import pytest
import torch

import turbokernels as tk
from turbokernels.testing import assert_close, matmul_allowance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = "sparse24_mm_kernel"
# The SASS of `mma.sp(::ordered_metadata).sync.aligned.m16n8k32.row.col.f32.{f16,bf16}...` as observed with nvcc 13.0
# for sm_80, sm_86, sm_89 and sm_90a: HMMA.SP.16832 (sparse HMMA, m16 n8 k32), .F32 accumulator, and a .BF16 suffix
# for bf16 inputs (fp16 inputs carry no type suffix).
MNEMONIC = {"F16": r"HMMA\.SP\.16832\.F32(?!\.BF16)", "BF16": r"HMMA\.SP\.16832\.F32\.BF16"}
# The kernel is instantiated per dtype tag and block tile: tk_sparse24::sparse24_mm_kernel<T, BN, BM, WARPS_N,
# WARPS_M>, T = tk_arch::F16 / tk_arch::BF16 (mangled `_ZN11tk_sparse243gpu18sparse24_mm_kernelIN7tk_arch3F16ELi64E
# Li64ELi2ELi2EEEvNS_6ParamsE`). Per k tile of 64 a warp issues 2 (k32 steps) x
# (BN / WARPS_N / 16) (m16 tiles along N) x (BM / WARPS_M / 8) (n8 tiles along M) mma.sp, fully unrolled: the SASS
# must hold exactly that many (fewer would mean a k step or a tile got lost). Both shipped tiles (64 x 64 and the
# M <= 16 one, 128 x 16) must be there.
TILE = re.compile(r"sparse24_mm_kernelIN7tk_arch(3F16|4BF16)ELi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")
TILES = {(64, 64, 2, 2), (128, 16, 4, 1)}
# Per architecture: 2 dtypes x (2 GEMM tiles + the split-K reduction) functions named sparse24*.
FUNCTIONS_PER_ARCH = 6


def _mma_per_k_tile(bn, bm, warps_n, warps_m):
    return 2 * (bn // warps_n // 16) * (bm // warps_m // 8)


def _flag(name):  # as setup.py reads its switches
    value = os.environ.get(name)
    return None if value in (None, "") else value not in ("0", "false", "False", "no")


def _arch_names(arch_list: str) -> set[str] | None:
    """TORCH_CUDA_ARCH_LIST -> the cubins it yields: "8.0;8.6 9.0a+PTX" -> {sm_80, sm_86, sm_90a}; None if it uses
    names this does not know (torch's "Ampere" etc.)."""
    names = set()
    for item in re.split(r"[;\s]+", arch_list.strip()):
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if m is None:
            return None
        names.add(f"sm_{m[1]}{m[2]}{m[3]}")
    return names


def _expected_archs() -> set[str] | None:
    """None where this environment's build of _C compiles no CUDA code (setup.py's rule); else the architectures
    TORCH_CUDA_ARCH_LIST names (empty if it is unset: which list the .so was built with is not known then, only that
    it has one, or if _arch_names does not parse it)."""
    if _flag("TURBOKERNELS_NO_EXT") or _flag("TURBOKERNELS_CUDA") is False:
        return None
    if not os.listdir(os.path.join(ROOT, "csrc", "cuda")):
        return None
    if _flag("TURBOKERNELS_CUDA") is None:
        cuda_home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
        if not (torch.version.cuda and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))):
            return None
    return _arch_names(os.environ.get("TORCH_CUDA_ARCH_LIST", "")) or set()


def _cuobjdump() -> str:
    try:
        import triton
    except ImportError:
        pytest.skip("triton is not installed (its cuobjdump is used to read the SASS)")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        path = shutil.which("cuobjdump")
    if not path:
        pytest.skip("no cuobjdump (triton's backends/nvidia/bin or PATH)")
    return path


def _extension_path() -> str:
    spec = importlib.util.find_spec("turbokernels._C")  # the file, without loading it
    if spec is None or spec.origin is None:
        if _flag("TURBOKERNELS_REQUIRE_EXT"):
            pytest.fail("turbokernels._C is not built, and TURBOKERNELS_REQUIRE_EXT=1")
        pytest.skip("turbokernels._C is not built (pure-Python install)")
    return spec.origin


def _built_archs() -> list[str]:
    """The architectures turbokernels._C holds SASS for: its embedded cubins, as `cuobjdump --list-elf` names them
    (`ELF file    1: sparse24_mm.sm_80.cubin`). Fails if an expected one (_expected_archs) is missing, skips if the
    .so has none and none was expected, fails if it has none where a CUDA build was expected."""
    path = _extension_path()
    proc = subprocess.run([_cuobjdump(), "--list-elf", path], capture_output=True, text=True)
    archs = sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.cubin$", proc.stdout, flags=re.M)))
    expected = _expected_archs()
    if expected is None and not archs:
        pytest.skip("turbokernels._C holds no device code, and this environment builds none (no nvcc or a CPU-only "
                    "torch, or TURBOKERNELS_CUDA=0)")
    missing = sorted((expected or set()) - set(archs))
    assert archs and not missing, (
        f"turbokernels._C ({path}) holds SASS for {archs or 'no architecture'}, missing {missing or 'any'} "
        f"(TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')!r}): rebuild with `make install`. "
        f"cuobjdump: {proc.stdout}{proc.stderr}")
    return archs


def _dump(flag: str) -> str:
    proc = subprocess.run([_cuobjdump(), flag, _extension_path()], capture_output=True, text=True)
    return proc.stdout + proc.stderr


def _per_arch_functions(text: str) -> dict[str, dict[str, str]]:
    """cuobjdump output -> {arch: {mangled function name: its section of the dump}}. Each embedded cubin starts
    with an `arch = sm_XX` header; in it, each function with `Function : name` (SASS) or `Function name:` (resource
    usage)."""
    result: dict[str, dict[str, str]] = {}
    for chunk in re.split(r"^arch = ", text, flags=re.M)[1:]:
        arch = chunk.split(None, 1)[0]
        funcs = result.setdefault(arch, {})
        pieces = re.split(r"^\s*Function\s*:?\s*([A-Za-z0-9_$.]+)\s*:?\s*$", chunk, flags=re.M)
        for name, body in zip(pieces[1::2], pieces[2::2]):
            funcs[name] = funcs.get(name, "") + body
    return result


def _sparse24_kernels(per_arch: dict[str, dict[str, str]], arch: str) -> dict[tuple, str]:
    """{(dtype tag, BN, BM, WARPS_N, WARPS_M): section} of the sparse24 GEMM kernels of one architecture."""
    found = {}
    for name, body in per_arch.get(arch, {}).items():
        if KERNEL in name:
            m = TILE.search(name)
            assert m, f"{arch}: unexpected sparse24 kernel name {name}"
            tag = m.group(1).lstrip("0123456789")
            found[(tag, *(int(v) for v in m.groups()[1:]))] = body
    return found


def test_arch_names():
    assert _arch_names("8.0;8.6;8.9;9.0a") == {"sm_80", "sm_86", "sm_89", "sm_90a"}
    assert _arch_names(" 8.0 9.0+PTX ") == {"sm_80", "sm_90"}
    assert _arch_names("Ampere") is None and _arch_names("") is None


def test_sparse24_kernels_use_sparse_tensor_cores():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-sass"))
    assert sorted(per_arch) == archs, f"--dump-sass shows {sorted(per_arch)}, --list-elf {archs}"
    expected = {(tag, *tile) for tag in MNEMONIC for tile in TILES}
    for arch in archs:
        kernels = _sparse24_kernels(per_arch, arch)
        assert set(kernels) == expected, f"{arch}: sparse24 kernels {sorted(kernels)}, expected {sorted(expected)}"
        for (tag, *tile), body in kernels.items():
            mma = re.findall(r"\bHMMA\.[A-Z0-9.]+", body)
            wanted = [m for m in mma if re.fullmatch(MNEMONIC[tag], m)]
            n = _mma_per_k_tile(*tile)
            assert len(wanted) == n, (f"{arch} {tag} tile {tile}: expected {n} sparse HMMA ({MNEMONIC[tag]}), found "
                                      f"{len(wanted)}; all HMMA: {sorted(set(mma)) or 'none'}")
            assert len(wanted) == len(mma), f"{arch} {tag} tile {tile}: unexpected dense/other HMMA: {sorted(set(mma))}"


def test_sparse24_kernels_use_no_local_memory():
    archs = _built_archs()
    per_arch = _per_arch_functions(_dump("--dump-resource-usage"))
    assert sorted(per_arch) == archs, f"--dump-resource-usage shows {sorted(per_arch)}, --list-elf {archs}"
    for arch in archs:
        checked = 0
        for name, body in per_arch[arch].items():
            if "sparse24" not in name:
                continue
            usage = dict(re.findall(r"\b([A-Z]+(?:\[\d+\])?):(\d+)", body))
            assert usage.get("LOCAL") == "0", f"{arch} {name}: local memory (spills) {usage}"
            assert usage.get("STACK") == "0", f"{arch} {name}: stack frame {usage}"
            assert 0 < int(usage["REG"]) <= 255, f"{arch} {name}: registers {usage}"
            assert int(usage.get("SHARED", 0)) <= 48 * 1024, f"{arch} {name}: static shared memory {usage}"
            checked += 1
        assert checked >= FUNCTIONS_PER_ARCH, f"{arch}: {checked} sparse24 functions, expected {FUNCTIONS_PER_ARCH}"


# ---- on a GPU ------------------------------------------------------------------------------------------------------
def make_sparse(N, K, dtype):
    """2:4 weight with all-zero groups and single-nonzero groups at every position (the odd metadata encodings)."""
    w = tk.prune_24(torch.randn(N, K, device="cuda")).to(dtype)
    groups = w.view(N, K // 4, 4)
    groups[:, 0] = 0
    for p in range(4):
        groups[:, p + 1] = 0
        groups[:, p + 1, p] = torch.randn(N, device="cuda").to(dtype)
    return w


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,K", [(4096, 4096), (113, 96)])
@pytest.mark.parametrize("M", [1, 16, 17, 2048])
def test_cuda_matches_golden(dtype, N, K, M):
    w = make_sparse(N, K, dtype)
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(M, K, device="cuda").to(dtype)
    with tk.backend("cuda"):
        out = tk.sparse24_linear(x, weight)
        again = tk.sparse24_linear(x, weight)
    golden = x.double() @ w.double().t()
    baseline = torch.nn.functional.linear(x, w)
    assert out.dtype == dtype and out.shape == (M, N)
    assert_close(out, golden, baseline, allowance=matmul_allowance(x, w.t()), what=f"cuda {dtype} M={M} N={N} K={K}")
    assert torch.equal(out, again), "not deterministic (split-K must reduce in a fixed order)"


@pytest.mark.gpu
def test_cuda_refuses_k_not_multiple_of_32():
    w = make_sparse(64, 48, torch.float16)
    weight = tk.Sparse24Weight.from_dense(w)
    x = torch.randn(3, 48, device="cuda", dtype=torch.float16)
    with tk.backend("cuda"), pytest.raises(tk.BackendUnavailable, match="multiple of 32"):
        tk.sparse24_linear(x, weight)
    with pytest.raises(RuntimeError, match=r"x.shape\[1\]"):
        torch.ops.turbokernels_C.sparse24_mm(x, weight.values, weight.meta)

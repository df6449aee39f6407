"""What every Triton launcher shares: interpreter detection, the architecture key, the SM count, and the cached
autotuner (each launcher's candidate configs are timed once per key, never on every call)."""
from __future__ import annotations

import dataclasses
import functools
import os
import threading
from typing import Callable, Hashable, Optional, Sequence, TypeVar

import torch

C = TypeVar("C")

# CPU tensors run under the interpreter: they take the Hopper configs, so tests cover the GPU's code path.
INTERPRETER_CAPABILITY = 90


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _round_bf16_to_nearest_in_interpreter() -> None:
    """Make the interpreter convert fp32 to bf16 the way the GPU does (round to nearest even).

    Under TRITON_INTERPRET=1, triton (3.6-3.8) converts fp32 -> bf16 by dropping the low 16 bits (measured: 507
    of 1024 random values one ulp off; asking for fp_downcast_rounding="rtne" takes the same path), so every bf16
    output of a kernel would carry up to one ulp of error a GPU never makes, and a tolerance tight enough to catch
    wrong kernels would fail right ones. `cvt.rn.bf16.f32` on the GPU rounds to nearest even; this replaces the
    interpreter's conversion (cast_impl and create_fp_to_fp of its builder) by that rounding, for fp32 -> bf16
    only. Only ever called when interpreting; tests/test_backends.py checks it took effect."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter as interp
    except ImportError:  # no triton: nothing runs under the interpreter
        return
    builder = interp.InterpreterBuilder
    if getattr(builder, "_turbokernels_bf16_rne", False):
        return

    def to_bf16(src):
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
        nan = np.isnan(src.data)
        if nan.any():  # keep NaN a (quiet) NaN: the carry above could turn it into inf
            rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
        return interp.TensorHandle(rounded, tl.bfloat16)

    def is_f32_to_bf16(src, dst_type):
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp
    builder.cast_impl = lambda self, src, dst_type: (
        to_bf16(src) if is_f32_to_bf16(src, dst_type) else cast_impl(self, src, dst_type))
    builder.create_fp_to_fp = lambda self, src, dst_type, rounding_mode: (
        to_bf16(src) if is_f32_to_bf16(src, dst_type) else fp_to_fp(self, src, dst_type, rounding_mode))
    builder._turbokernels_bf16_rne = True


def upcast_dots(dtype: torch.dtype) -> bool:
    """The kernels' UPCAST switch: fp32 inputs (dots in "ieee" fp32), and bf16 under the interpreter, whose bf16
    arithmetic is wrong (numpy works on the raw uint16 bits)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


# Held for the whole of every interpreted launch in the process (see _serialize_interpreted_launches).
INTERPRETER_LOCK = threading.RLock()


def _serialize_interpreted_launches() -> None:
    """Let only one thread at a time run a kernel under the interpreter.

    The interpreter keeps per-launch state in module globals (triton/runtime/interpreter.py, 3.6-3.8): one
    `interpreter_builder` whose grid_dim / grid_idx each launch sets before running each program (tl.program_id
    reads it), and `_patch_lang`, which swaps triton.language's builtins for interpreted ones at the start of a
    launch and restores the originals at its end. Two threads launching at once read each other's program ids
    (ValueError "y >= grid_dim[1]"; an id that happens to be in range would compute the wrong tile silently) or
    find the builtins restored under them ("`_semantic` argument must be provided outside of JIT functions"):
    measured, 13 of 32 launches from 4 threads failed; tests/test_threads.py fails without this lock. Launches that collide are launches anywhere in the process, so the lock wraps the interpreter's own
    entry point (InterpretedFunction.run: what `kernel[grid](...)` calls) rather than our launchers. A reentrant
    lock: a pre-run hook may launch. GPU launches never come here and stay lock-free. Only ever called when
    interpreting."""
    try:
        from triton.runtime import interpreter as interp
    except ImportError:  # no triton: nothing runs under the interpreter
        return
    cls = interp.InterpretedFunction
    if getattr(cls, "_turbokernels_run", None) is not None:
        return
    cls._turbokernels_run = cls.run  # the interpreter's own

    @functools.wraps(cls.run)
    def serialized_run(self, *args, **kwargs):
        with INTERPRETER_LOCK:
            return self._turbokernels_run(*args, **kwargs)

    cls.run = serialized_run


if interpreting():
    _round_bf16_to_nearest_in_interpreter()
    _serialize_interpreted_launches()


def capability(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_CAPABILITY
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def nearest_arch(table: dict, cap: int):
    """The key of `table` for compute capability `cap`: the nearest lower one (or the lowest)."""
    return max([k for k in table if k <= cap], default=min(table))


def int32_tile_offsets(t: torch.Tensor, tile: Sequence[int]) -> torch.Tensor:
    """`t`, or a contiguous copy of it when a tile of `tile[i]` indices along dimension i (0: the dimension is
    addressed by 64-bit offsets only) would not be addressable in 32 bits. Where the attention kernels add a
    64-bit block base (block start * stride) and 32-bit offsets inside the block (index in tile * stride), that is
    exact while the largest in-tile offset, sum_i (tile[i] - 1) * |stride_i|, stays below 2^31. Only a strange view
    fails that (a row stride above 2^31 / 127 elements with 128-row tiles); a contiguous tensor within the limits
    (heads < 2^16, head dim <= 256, tiles <= 128 rows) never does."""
    span = sum((n - 1) * abs(s) for n, s in zip(tile, t.stride()) if n > 1)
    return t if span < 2 ** 31 else t.contiguous()


@functools.lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pow2_bucket(n: int, cap: int) -> int:
    """Round n up to a power of two, at most `cap`: shapes in one bucket share a tuned config."""
    return 1 << max(0, (n - 1).bit_length()) if n <= cap else cap


def _benchmark(fn: Callable[[], object]) -> float:
    """Milliseconds per call of fn on the GPU (a module function: tests replace it to check the locking)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=5, rep=20)


# One tuning at a time in the process: candidates timed while another thread times its own on the same GPU would be
# measured against each other's load (and a key tuned by two threads at once would be timed twice). Reentrant, so
# a candidate's launch may itself tune another key. Held only while a key is tuned, never on the tuned path.
_TUNING_LOCK = threading.RLock()
_UNTUNED = object()


class Autotuner:
    """Times a launcher's candidates once per key and remembers the fastest. Thread-safe: a key is tuned once
    (concurrent first calls wait for it), tunings never overlap, and a tuned key is read without a lock."""

    def __init__(self) -> None:
        self.best: dict[Hashable, object] = {}

    def choose(self, device: torch.device, candidates: Sequence[C], key: Hashable,
               launch: Callable[[C], object]) -> C:
        """The first candidate under the interpreter, with TURBOKERNELS_AUTOTUNE=0, or when there is one; else the
        fastest for `key` (timed on first use). While a CUDA graph is being captured only a tuned key is served:
        timing launches inside a capture would record them into the graph (and synchronizing is forbidden there),
        and silently taking the first candidate would freeze an untuned kernel into every replay."""
        if device.type != "cuda" or len(candidates) == 1 or os.environ.get("TURBOKERNELS_AUTOTUNE", "1") == "0":
            return candidates[0]
        key = (device.index, key)
        best = self.best.get(key, _UNTUNED)
        if best is not _UNTUNED:
            return best
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "turbokernels: a Triton kernel was called with a new shape while a CUDA graph is being captured, "
                f"before it was tuned for it (key {key[1]!r}). Run the step once outside the capture first (a "
                "warm-up call; torch.compile(mode='reduce-overhead') does this by itself), or set "
                "TURBOKERNELS_AUTOTUNE=0 to take each kernel's first config without tuning.")
        with _TUNING_LOCK:
            best = self.best.get(key, _UNTUNED)  # tuned by another thread while this one waited
            if best is _UNTUNED:
                timings = []
                for cand in candidates:
                    try:
                        ms = _benchmark(lambda: launch(cand))
                    except Exception:  # noqa: BLE001 - e.g. out of shared memory on a smaller part: skip the candidate
                        continue
                    timings.append((ms, cand))
                best = min(timings, key=lambda t: t[0])[1] if timings else candidates[0]
                self.best[key] = best
        return best


# ---- GEMM-like kernels (int4_mm, sparse24_mm): one config type, split-K for decode -------------------------------
@dataclasses.dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8

    @property
    def is_decode(self) -> bool:
        return self.BLOCK_M <= 16


# M up to this is "decode": tiles 16 rows tall (the smallest tensor-core M) and K split across programs, since the
# time is that of streaming the weight once.
DECODE_MAX_M = 16


def split_k_plan(K: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(splits, K rows per split): at most `split_k` splits, each a whole number of BLOCK_K tiles."""
    split_k = max(1, min(split_k, -(-K // block_k)))
    k_per_split = -(-(-(-K // split_k)) // block_k) * block_k
    return -(-K // k_per_split), k_per_split


def split_k_output(empty: Callable, M: int, N: int, splits: int, like: torch.Tensor):
    """(buffer, (split, row, column) strides): the output itself, or fp32 partial sums when K is split."""
    if splits == 1:
        out = empty((M, N), device=like.device, dtype=like.dtype)
        return out, (0, out.stride(0), out.stride(1))
    out = empty((splits, M, N), device=like.device, dtype=torch.float32)
    return out, out.stride()


def split_k_result(out: torch.Tensor, splits: int, dtype: torch.dtype,
                   bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (M, N) result in `dtype`. Unsplit, `out` is it (the kernel added the bias to its fp32 accumulator).
    Split, the fp32 partials are summed and the bias added in fp32 before the one rounding to `dtype`: the output
    is rounded once, as torch's F.linear does, never once for the product and again for the bias."""
    if splits == 1:
        return out
    acc = out.sum(dim=0)
    if bias is not None:
        acc += bias  # computed in acc's fp32 (the bias's upcast is exact), without a separate conversion kernel
    return acc.to(dtype)

"""The GPU acceptance table: which CUDA C++ backends have passed on which GPU architecture.

A backend registered with `auto=backends.VERIFIED` (the CUDA C++ kernels of csrc/cuda/) is tried by automatic
selection only for calls whose tensors sit on a CUDA device of an architecture listed here for it, with
`faster_than_triton=True`; everywhere else it runs only when forced (`with turbokernels.backend("cuda")`).
`turbokernels info` prints, for each such backend, where it is automatic and on what evidence.

The rule (code that has not run on a GPU is never a default):
  * an entry is added only together with its GPU evidence committed under bench/results/<folder>/: the output of
    bench/gpu_check.sh on that architecture (gpu_check.log, which shows the backend's GPU tests passing, and the
    unpacked results.tar.gz with the benchmark CSVs);
  * a kernel becomes automatic for an architecture only when it passed there AND the benchmark in that folder
    showed it faster than our Triton kernel for the op (faster_than_triton=True); an entry with
    faster_than_triton=False records that it is correct there but stays forced-only (Triton remains the default);
  * one architecture's evidence says nothing about another's (sm_90's wgmma/TMA paths are not sm_80's code).

The table is literal code, read when a call's choice is made (backends.select remembers choices per key, so it is
meant to be fixed at import, like AUTO_ORDER). Today it is empty: no CUDA C++ kernel has run on a GPU yet.
An entry will look like this (an illustration, not a result):

    PASSED = {
        ("int4_mm", "cuda"): {
            "sm_90": Evidence(results="bench/results/gpu-h200-2027-01-15", faster_than_triton=True,
                              note="int4 1.4x triton at M <= 16, 1.1x at M = 2048"),
        },
    }
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

ARCH_RE = re.compile(r"sm_[1-9][0-9]{1,2}")
RESULTS_DIR = "bench/results"
# What a results folder must hold to count as gpu_check.sh's output (its log; the archive's files beside it).
EVIDENCE_LOG = "gpu_check.log"


@dataclasses.dataclass(frozen=True)
class Evidence:
    results: str                 # the folder under bench/results/ with bench/gpu_check.sh's output for this GPU
    faster_than_triton: bool     # the benchmark there: this backend beat our Triton kernel for the op
    note: str = ""               # one line: what the benchmark showed (shapes, ratios)


# (op, backend) -> {architecture ("sm_90"): Evidence}. Empty until a CUDA C++ kernel has passed on a real GPU.
PASSED: dict[tuple[str, str], dict[str, Evidence]] = {}


def arch_name(capability: tuple[int, int]) -> str:
    """(9, 0) -> "sm_90", (12, 0) -> "sm_120": the name nvcc and the table use for a compute capability."""
    major, minor = capability
    return f"sm_{major}{minor}"


def verified(op: str, backend: str, capability: Optional[tuple[int, int]]) -> bool:
    """True when automatic selection may run `backend` for `op` on a GPU of this compute capability (None: not a
    CUDA device): it passed there and was faster than our Triton kernel."""
    if capability is None:
        return False
    evidence = PASSED.get((op, backend), {}).get(arch_name(capability))
    return evidence is not None and evidence.faster_than_triton


def listing(op: str, backend: str) -> str:
    """One line for `turbokernels info`: where the backend is automatic, and on what evidence."""
    entries = PASSED.get((op, backend), {})
    auto = [f"{arch} ({e.results})" for arch, e in sorted(entries.items()) if e.faster_than_triton]
    slower = [f"{arch} ({e.results})" for arch, e in sorted(entries.items()) if not e.faster_than_triton]
    if not auto and not slower:
        return "only when forced: not yet verified on a GPU (acceptance table: python/turbokernels/acceptance.py)"
    parts = []
    if auto:
        parts.append("automatic on: " + ", ".join(auto))
    if slower:
        parts.append("passed but not faster than triton (forced only) on: " + ", ".join(slower))
    if not auto:
        parts[0] = "only when forced; " + parts[0]
    return "; ".join(parts)


def problems(table: Optional[dict] = None, repo_root: Optional[str] = None) -> list[str]:
    """What is wrong with the table's shape (tests/test_acceptance.py): unknown ops or backends, malformed
    architecture names, evidence that is not a bench/gpu_check.sh output committed under bench/results/. Needs the
    ops registered (import turbokernels first); repo_root: the checkout holding bench/results/ (default: found
    from this file, for a source checkout)."""
    from . import backends
    table = PASSED if table is None else table
    if repo_root is None:
        repo_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = []
    for key, archs in table.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            out.append(f"{key!r}: the key must be (op, backend)")
            continue
        op, backend = key
        impl = backends.registered(op).get(backend)
        if impl is None:
            out.append(f"{key!r}: there is no {backend!r} backend registered for op {op!r}")
        elif impl.auto != backends.VERIFIED:
            out.append(f"{key!r}: registered with auto={impl.auto!r}; the table is read only for "
                       f"auto=backends.VERIFIED")
        if not isinstance(archs, dict) or not archs:
            out.append(f"{key!r}: expected a non-empty {{'sm_XY': Evidence}} dict")
            continue
        for arch, e in archs.items():
            where = f"{key!r}[{arch!r}]"
            if not isinstance(arch, str) or not ARCH_RE.fullmatch(arch):
                out.append(f"{where}: the architecture must look like 'sm_90'")
            if not isinstance(e, Evidence):
                out.append(f"{where}: expected an Evidence, got {type(e).__name__}")
                continue
            if not isinstance(e.faster_than_triton, bool):
                out.append(f"{where}: faster_than_triton must be True or False")
            path = os.path.normpath(e.results) if isinstance(e.results, str) else ""
            if not path.startswith(RESULTS_DIR + os.sep) or path.count(os.sep) != 2:
                out.append(f"{where}: results must be a folder directly under {RESULTS_DIR}/, got {e.results!r}")
            elif not os.path.isfile(os.path.join(repo_root, path, EVIDENCE_LOG)):
                out.append(f"{where}: {path}/{EVIDENCE_LOG} (bench/gpu_check.sh's log) is not in the repository")
    return out

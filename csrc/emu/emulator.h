// A CPU emulator of the CUDA execution model, small enough to read: it runs the kernels of csrc/cuda/*.cuh as they
// are, thread by thread, so that CI (no GPU) checks the per-thread logic of the CUDA C++ kernels: index maps,
// fragment layouts, the int4 repack and dequantization bit tricks, the pipeline's waits and barriers, split-K.
//
// Model. One launch runs its blocks one after another. A block's threads are fibers (ucontext) on this one OS
// thread, executed one after another: a thread runs until it reaches a barrier, then the lowest-numbered runnable
// thread runs (so earlier warps run ahead of later ones as far as the barriers let them: the order that exposes a
// missing __syncthreads). So
//   * __syncthreads() (syncthreads below) is a barrier of every thread of the block;
//   * a warp-collective instruction (ldmatrix, mma) is two barriers of the warp's 32 lanes: each lane deposits its
//     operands, every lane computes its own result from all deposits (with the fragment tables of the PTX ISA,
//     csrc/emu/ptx_fragments.h), then a second barrier so that no lane overwrites its deposit early. All 32 lanes
//     must take part, in the same instruction: a divergent warp is reported, as are deadlocks (a barrier that not
//     every thread reaches);
//   * cp.async copies are queued per thread and land only when that thread's cp.async.wait_group retires their
//     group, as on the GPU: shared memory starts poisoned (all bytes 0xFF: NaN in fp16/bf16/fp32), so a read before
//     the wait (a missing wait or barrier) sees NaN, not the right data;
//   * every global access (cp.async source, ld/st through the helpers) must fall inside a buffer the launch named,
//     every shared access inside the block's shared memory, with the alignment the instruction needs.
// What it does not model: timing, bank conflicts, the memory model beyond program order (blocks run in sequence, so
// a last-block-reduces split-K sees the other blocks' partials as on a GPU after __threadfence), tensor-core
// accumulation order (mma sums in fp32 in k order; the real unit differs in the last bits, which the tests' error
// bounds allow for).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace tk_emu {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// A global-memory buffer the kernel may access.
struct Buffer {
  const void* data;
  size_t bytes;
  bool writable;
  const char* name;
};

struct LaunchConfig {
  Dim3 grid, block;
  size_t shared_bytes = 0;   // dynamic shared memory of each block
  std::vector<Buffer> buffers;
};

// Runs `kernel` (the kernel's body, called once per thread) over the grid. Throws std::runtime_error with the first
// error any thread reported (the thread and block named).
void launch(const LaunchConfig& config, const std::function<void()>& kernel);

// ---- what kernel code sees (through csrc/cuda/arch.cuh) -----------------------------------------------------
const Dim3& thread_idx();
const Dim3& block_idx();
const Dim3& block_dim();
const Dim3& grid_dim();
unsigned lane();
char* shared_memory();

void syncthreads();

// Warp collectives. warp_gather copies `bytes` (<= kSlotBytes) from `in` into this lane's slot, waits for all 32
// lanes of the warp (which must call the same `op`), and returns the 32 slots (slot i at i * kSlotBytes). After
// reading them the lane calls warp_release(). `op` names the instruction in error messages.
constexpr size_t kSlotBytes = 64;
const unsigned char* warp_gather(const char* op, const void* in, size_t bytes);
void warp_release();

// cp.async: `bytes` (4, 8 or 16) to shared `dst`, of which the first `src_bytes` are read from global `src` and
// the rest zero-filled.
void cp_async(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);   // retire all but the `pending` most recent committed groups

// Checked accesses: throw unless [p, p + bytes) lies in a launch buffer (writable for stores) / in shared memory,
// aligned to `bytes`.
void check_global(const void* p, size_t bytes, bool write);
void check_shared(const void* p, size_t bytes);

[[noreturn]] void fail(const std::string& what);

}  // namespace tk_emu

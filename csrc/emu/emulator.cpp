// The CUDA execution-model emulator (see emulator.h for the model and what it checks).
#include "emu/emulator.h"

#include <ucontext.h>

#include <cstring>
#include <memory>
#include <sstream>
#include <stdexcept>

namespace tk_emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per emulated thread; kernels keep their fragments in locals

struct Copy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Thread {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Dim3 idx;
  unsigned linear = 0;
  bool done = false;
  // 0: runnable; 1: waiting at the block barrier; 2: waiting at its warp's barrier. Released when the barrier's
  // generation passes wait_generation.
  int waiting = 0;
  uint64_t wait_generation = 0;
  std::vector<std::vector<Copy>> committed;  // cp.async groups, oldest first
  std::vector<Copy> open;                    // issued since the last commit
};

struct Warp {
  unsigned arrived = 0;
  uint64_t generation = 0;
  const char* op = nullptr;  // the collective the current arrivals are executing
  alignas(16) unsigned char slots[32][kSlotBytes];
};

struct Block {
  const LaunchConfig* config = nullptr;
  Dim3 idx;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::unique_ptr<char[]> shared;
  unsigned barrier_arrived = 0;
  uint64_t barrier_generation = 0;
  ucontext_t scheduler;
  std::string error;
};

Block* g_block = nullptr;
Thread* g_thread = nullptr;
const std::function<void()>* g_kernel = nullptr;

std::string where() {
  std::ostringstream s;
  if (g_block != nullptr && g_thread != nullptr) {
    s << "block (" << g_block->idx.x << ", " << g_block->idx.y << ", " << g_block->idx.z << ") thread ("
      << g_thread->idx.x << ", " << g_thread->idx.y << ", " << g_thread->idx.z << ")";
  }
  return s.str();
}

void yield_to_scheduler() { swapcontext(&g_thread->context, &g_block->scheduler); }

void thread_main() {
  try {
    (*g_kernel)();
  } catch (const std::exception& e) {
    if (g_block->error.empty()) g_block->error = e.what();
  }
  g_thread->done = true;
  // returning resumes uc_link: the scheduler
}

bool runnable(const Block& b, const Thread& t) {
  if (t.done) return false;
  if (t.waiting == 1) return b.barrier_generation > t.wait_generation;
  if (t.waiting == 2) return b.warps[t.linear / 32].generation > t.wait_generation;
  return true;
}

void run_block(Block& b) {
  const unsigned n = static_cast<unsigned>(b.threads.size());
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = b.threads[i];
    getcontext(&t.context);
    t.stack.reset(new char[kStackBytes]);
    t.context.uc_stack.ss_sp = t.stack.get();
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &b.scheduler;
    makecontext(&t.context, thread_main, 0);
  }
  for (;;) {
    bool progress = false, all_done = true;
    for (unsigned i = 0; i < n && b.error.empty(); ++i) {
      Thread& t = b.threads[i];
      if (!t.done) all_done = false;
      if (!runnable(b, t)) continue;
      t.waiting = 0;
      g_thread = &t;
      swapcontext(&b.scheduler, &t.context);
      g_thread = nullptr;
      progress = true;
      // Restart from the lowest runnable thread: warp 0 runs ahead as far as it can before later warps start, so
      // a read of shared memory that other warps fill, without the block barrier between, sees their copies still
      // pending (poison) -- round-robin order would have let every thread reach its wait first and hidden it.
      break;
    }
    if (!b.error.empty() || all_done) break;
    if (!progress) {
      std::ostringstream s;
      s << "deadlock in block (" << b.idx.x << ", " << b.idx.y << ", " << b.idx.z << "): ";
      unsigned finished = 0, at_block = 0, at_warp = 0;
      for (const Thread& t : b.threads) (t.done ? finished : t.waiting == 1 ? at_block : at_warp)++;
      s << finished << " threads finished, " << at_block << " wait at __syncthreads, " << at_warp
        << " at a warp collective that not all 32 lanes reach";
      b.error = s.str();
      break;
    }
  }
}

const Buffer* find_buffer(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (const Buffer& buf : g_block->config->buffers) {
    const char* begin = static_cast<const char*>(buf.data);
    if (c >= begin && c + bytes <= begin + buf.bytes) return &buf;
  }
  return nullptr;
}

void perform(const Copy& c) {
  std::memcpy(c.dst, c.src, c.src_bytes);
  std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
}

}  // namespace

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error(where() + ": " + what); }

void launch(const LaunchConfig& config, const std::function<void()>& kernel) {
  const Dim3 bd = config.block;
  const unsigned threads = bd.x * bd.y * bd.z;
  if (threads == 0 || threads % 32 != 0 || threads > 1024) {
    throw std::runtime_error("tk_emu::launch: the block must have a multiple of 32 threads, at most 1024");
  }
  g_kernel = &kernel;
  for (unsigned bz = 0; bz < config.grid.z; ++bz)
    for (unsigned by = 0; by < config.grid.y; ++by)
      for (unsigned bx = 0; bx < config.grid.x; ++bx) {
        Block b;
        b.config = &config;
        b.idx = Dim3{bx, by, bz};
        b.threads.resize(threads);
        b.warps.resize(threads / 32);
        for (unsigned i = 0; i < threads; ++i) {
          b.threads[i].linear = i;
          b.threads[i].idx = Dim3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
        }
        b.shared.reset(new char[config.shared_bytes + 16]);
        std::memset(b.shared.get(), 0xFF, config.shared_bytes + 16);  // poison: NaN in every float format
        g_block = &b;
        run_block(b);
        g_block = nullptr;
        if (!b.error.empty()) throw std::runtime_error(b.error);
      }
  g_kernel = nullptr;
}

const Dim3& thread_idx() { return g_thread->idx; }
const Dim3& block_idx() { return g_block->idx; }
const Dim3& block_dim() { return g_block->config->block; }
const Dim3& grid_dim() { return g_block->config->grid; }
unsigned lane() { return g_thread->linear % 32; }
char* shared_memory() { return g_block->shared.get(); }

void syncthreads() {
  Block& b = *g_block;
  g_thread->waiting = 1;
  g_thread->wait_generation = b.barrier_generation;
  if (++b.barrier_arrived == b.threads.size()) {
    b.barrier_arrived = 0;
    ++b.barrier_generation;
  }
  yield_to_scheduler();
}

namespace {
void warp_barrier(const char* op) {
  Warp& w = g_block->warps[g_thread->linear / 32];
  if (w.arrived == 0) {
    w.op = op;
  } else if (std::strcmp(w.op, op) != 0) {
    fail(std::string("warp divergence: lane ") + std::to_string(lane()) + " executes " + op +
         " while other lanes of its warp execute " + w.op);
  }
  g_thread->waiting = 2;
  g_thread->wait_generation = w.generation;
  if (++w.arrived == 32) {
    w.arrived = 0;
    ++w.generation;
  }
  yield_to_scheduler();
}
}  // namespace

const unsigned char* warp_gather(const char* op, const void* in, size_t bytes) {
  if (bytes > kSlotBytes) fail("warp_gather: operands too large");
  Warp& w = g_block->warps[g_thread->linear / 32];
  std::memcpy(w.slots[lane()], in, bytes);
  warp_barrier(op);
  return &w.slots[0][0];
}

void warp_release() { warp_barrier("(release)"); }

void check_global(const void* p, size_t bytes, bool write) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0) {
    fail("misaligned global access of " + std::to_string(bytes) + " bytes");
  }
  const Buffer* buf = find_buffer(p, bytes);
  if (buf == nullptr) fail("global access of " + std::to_string(bytes) + " bytes outside every buffer of the launch");
  if (write && !buf->writable) fail(std::string("store into the read-only buffer ") + buf->name);
}

void check_shared(const void* p, size_t bytes) {
  const char* c = static_cast<const char*>(p);
  const char* base = g_block->shared.get();
  if (c < base || c + bytes > base + g_block->config->shared_bytes) {
    fail("shared access of " + std::to_string(bytes) + " bytes at offset " + std::to_string(c - base) +
         " outside the block's " + std::to_string(g_block->config->shared_bytes) + " bytes of shared memory");
  }
  if (static_cast<size_t>(c - base) % bytes != 0) {
    fail("misaligned shared access of " + std::to_string(bytes) + " bytes at offset " + std::to_string(c - base));
  }
}

void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("cp.async copies 4, 8 or 16 bytes");
  if (src_bytes < 0 || src_bytes > bytes) fail("cp.async: src-size must be in [0, cp-size]");
  check_shared(dst, bytes);
  if (src_bytes > 0) check_global(src, bytes, false);  // the GPU requires the whole cp-size aligned
  g_thread->open.push_back(Copy{dst, src, bytes, src_bytes});
}

void cp_async_commit() {
  g_thread->committed.push_back(std::move(g_thread->open));
  g_thread->open.clear();
}

void cp_async_wait(int pending) {
  auto& groups = g_thread->committed;
  while (groups.size() > static_cast<size_t>(pending)) {
    for (const Copy& c : groups.front()) perform(c);
    groups.erase(groups.begin());
  }
}

}  // namespace tk_emu

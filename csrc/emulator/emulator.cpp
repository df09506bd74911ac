// The emulator's scheduler (see cuda_emulator.h): blocks run one after another on the calling
// OS thread, each block's threads are fibers switched at __syncthreads, __syncwarp and shuffles.
//
// One file of over 500 lines on purpose: the fibers' context switch, the scheduler and the
// device-side primitives (barriers, shuffles, shared memory) all work on the same private state
// (the running block's Thread records and the Emulator), which no other file may see; split,
// that state would have to move into a header every piece includes.
#include "cuda_emulator.h"

#include <sys/mman.h>

#include <algorithm>
#include <exception>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <vector>

// FL_EMU_UCONTEXT forces the portable switch on x86-64 too (to test and time it).
#if defined(__x86_64__) && !defined(FL_EMU_UCONTEXT)
#define FL_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace cuda_emu {

thread_local const Coords* current = nullptr;

namespace {

constexpr size_t kSharedLimit = 48 * 1024;
constexpr unsigned kMaxThreads = 1024;
// TORCH_CHECK builds a message and captures a backtrace on the fiber's stack; pages are only
// committed when touched.
constexpr size_t kStackBytes = 256 * 1024;

// ---- contexts: a hand-written switch on x86-64 (callee-saved registers and rsp, about 30x
// cheaper than swapcontext, which makes a syscall per switch), ucontext elsewhere ------------

struct Thread;
extern "C" void fl_emu_fiber_main(Thread* t);

#if defined(FL_EMU_ASM_SWITCH)
extern "C" void fl_emu_switch(void** save_sp, void* to_sp);
extern "C" void fl_emu_trampoline();
// Saves rbp, rbx, r12-r15, MXCSR and the x87 control word on the current stack, stores rsp in
// *save_sp, and restores the same from to_sp. A new fiber's stack is laid out as if it had
// switched away just before fl_emu_trampoline, which calls r13(r12).
asm(R"(
  .text
  .p2align 4
  .globl fl_emu_switch
  .hidden fl_emu_switch
  .type fl_emu_switch,@function
fl_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fl_emu_switch, .-fl_emu_switch

  .p2align 4
  .globl fl_emu_trampoline
  .hidden fl_emu_trampoline
  .type fl_emu_trampoline,@function
fl_emu_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  movq %r12, %rdi
  callq *%r13
  ud2
  .cfi_endproc
  .size fl_emu_trampoline, .-fl_emu_trampoline
)");

struct Context {
  void* sp = nullptr;
};

void context_init(Context& c, char* stack, size_t size, Thread* t) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* w = reinterpret_cast<uint64_t*>(top) - 8;
  uint32_t csr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(csr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  w[0] = csr | (uint64_t(fcw) << 32);
  w[1] = w[2] = 0;                                        // r15, r14
  w[3] = reinterpret_cast<uint64_t>(&fl_emu_fiber_main);  // r13
  w[4] = reinterpret_cast<uint64_t>(t);                   // r12
  w[5] = w[6] = 0;                                        // rbx, rbp
  w[7] = reinterpret_cast<uint64_t>(&fl_emu_trampoline);  // return address
  c.sp = w;
}

void context_switch(Context& from, Context& to) { fl_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

Thread* g_starting = nullptr;
void fiber_start() { fl_emu_fiber_main(g_starting); }

void context_init(Context& c, char* stack, size_t size, Thread* t) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, fiber_start, 0);
  (void)t;
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- the block being run -------------------------------------------------------------------

enum class State { kRunnable, kBarrier, kWarp, kExited };

struct Thread {
  Coords coords;
  unsigned linear = 0;
  State state = State::kRunnable;
  bool started = false;
  Loc at{nullptr, 0};  // where it waits
  // The warp operation it waits in (shuffle, or __syncwarp when is_shuffle is false).
  bool is_shuffle = false;
  Shfl kind = Shfl::kIdx;
  unsigned mask = 0;
  int arg = 0, width = 32;
  uint64_t in = 0, out = 0;
  Context ctx;
  char* stack = nullptr;
  std::exception_ptr error;
};

struct Emulator {
  std::mutex mutex;
  Order order = Order::kForward;
  std::mt19937_64 rng{0};
  Counters totals{0, 0};
  std::vector<char*> stacks;
  std::vector<Thread> threads;
  Context scheduler;
  Thread* running = nullptr;
  const std::function<void()>* body = nullptr;
  std::string kernel;
  Loc launched_at{nullptr, 0};
  size_t dynamic_smem = 0;
  uint64_t block_serial = 0;
  size_t shared_used = 0;
  alignas(64) char shared[kSharedLimit];
};

Emulator& emu() {
  static Emulator* e = new Emulator;  // never destroyed: fibers may outlive static teardown
  return *e;
}

std::string where(Loc at) {
  std::string f = at.file ? at.file : "?";
  const size_t slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(at.line);
}

std::string hex(unsigned v) {
  std::ostringstream s;
  s << "0x" << std::hex << v;
  return s.str();
}

std::string str(const uint3& v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

[[noreturn]] void fail(const std::string& what) {
  Emulator& e = emu();
  throw Error("CUDA emulator: kernel " + e.kernel + " (launched at " + where(e.launched_at) +
              "): " + what);
}

char* stack_for(size_t i) {
  Emulator& e = emu();
  while (e.stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (p == MAP_FAILED) throw Error("CUDA emulator: cannot allocate a fiber stack");
    mprotect(p, 4096, PROT_NONE);  // guard page: an overflow faults instead of corrupting
    e.stacks.push_back(static_cast<char*>(p));
  }
  return e.stacks[i];
}

// The calling fiber waits (state already set) until the scheduler resumes it.
void yield_to_scheduler() {
  Emulator& e = emu();
  Thread* t = e.running;
  context_switch(t->ctx, e.scheduler);
}

void resume(Thread& t) {
  Emulator& e = emu();
  e.running = &t;
  current = &t.coords;
  t.state = State::kRunnable;
  context_switch(e.scheduler, t.ctx);
  current = nullptr;
  e.running = nullptr;
}

Thread& calling_thread(const char* what) {
  Thread* t = emu().running;
  if (t == nullptr) throw Error(std::string("CUDA emulator: ") + what + " outside a kernel");
  return *t;
}

unsigned warp_of(const Thread& t) { return t.linear / 32; }
unsigned lane_of(const Thread& t) { return t.linear % 32; }

void shuffle_order(std::vector<unsigned>& ids) {
  Emulator& e = emu();
  if (e.order == Order::kReverse) std::reverse(ids.begin(), ids.end());
  if (e.order == Order::kShuffle) std::shuffle(ids.begin(), ids.end(), e.rng);
}

// The source lane (within the warp) of lane l in a shuffle.
unsigned shuffle_source(const Thread& t, unsigned l) {
  const unsigned w = static_cast<unsigned>(t.width), base = l / w * w;
  switch (t.kind) {
    case Shfl::kIdx:
      return base + static_cast<unsigned>(((t.arg % t.width) + t.width) % t.width);
    case Shfl::kUp: {
      const int s = static_cast<int>(l - base) - t.arg;
      return s < 0 ? l : base + static_cast<unsigned>(s);
    }
    case Shfl::kDown: {
      const unsigned s = l - base + static_cast<unsigned>(t.arg);
      return s >= w ? l : base + s;
    }
    case Shfl::kXor: {
      // CUDA: a lane may read an earlier segment; a later one gives it its own value.
      const unsigned s = l ^ static_cast<unsigned>(t.arg);
      return s >= base + w ? l : s;
    }
  }
  return l;
}

const char* op_name(const Thread& t) {
  if (!t.is_shuffle) return "__syncwarp";
  switch (t.kind) {
    case Shfl::kIdx:
      return "__shfl_sync";
    case Shfl::kUp:
      return "__shfl_up_sync";
    case Shfl::kDown:
      return "__shfl_down_sync";
    case Shfl::kXor:
      return "__shfl_xor_sync";
  }
  return "?";
}

std::string lane_desc(const Thread& t) {
  return "warp " + std::to_string(warp_of(t)) + " lane " + std::to_string(lane_of(t)) +
         " (thread " + str(t.coords.thread_idx) + ") at " + op_name(t) + " " + where(t.at);
}

// Completes the warp operations whose named lanes have all arrived at the same one. Returns
// whether any did.
bool resolve_warps(std::vector<Thread>& ts) {
  bool progress = false;
  const size_t n = ts.size();
  for (size_t first = 0; first < n; first += 32) {
    const size_t count = std::min<size_t>(32, n - first);
    for (size_t i = 0; i < count; ++i) {
      Thread& t = ts[first + i];
      if (t.state != State::kWarp) continue;
      bool ready = true;
      for (unsigned l = 0; l < 32 && ready; ++l) {
        if (!(t.mask >> l & 1u)) continue;
        if (l >= count || ts[first + l].state == State::kExited) {
          fail("block " + str(t.coords.block_idx) + ": the mask " + hex(t.mask) + " of " +
               lane_desc(t) + " names lane " + std::to_string(l) +
               (l >= count ? ", which the block does not have" : ", which has exited"));
        }
        const Thread& o = ts[first + l];
        ready = o.state == State::kWarp && o.mask == t.mask && o.is_shuffle == t.is_shuffle &&
                o.kind == t.kind && o.width == t.width && o.at.line == t.at.line &&
                o.at.file == t.at.file;
      }
      if (!ready) continue;
      for (unsigned l = 0; l < 32; ++l) {
        if (!(t.mask >> l & 1u)) continue;
        Thread& o = ts[first + l];
        if (o.is_shuffle) {
          const unsigned src = shuffle_source(o, l);
          if (!(t.mask >> src & 1u)) {
            fail("block " + str(o.coords.block_idx) + ": " + lane_desc(o) + " reads lane " +
                 std::to_string(src) + ", which is not in the mask");
          }
          o.out = ts[first + src].in;
        }
      }
      for (unsigned l = 0; l < 32; ++l) {
        if (t.mask >> l & 1u) ts[first + l].state = State::kRunnable;
      }
      progress = true;
    }
  }
  return progress;
}

// Nothing can run and no warp operation can complete: say why.
[[noreturn]] void fail_stuck_warp(const std::vector<Thread>& ts, const Thread& t) {
  const size_t first = t.linear / 32 * 32;
  for (unsigned l = 0; l < 32; ++l) {
    if (!(t.mask >> l & 1u)) continue;
    const Thread& o = ts[first + l];
    if (o.state == State::kBarrier) {
      fail("block " + str(t.coords.block_idx) + ": " + lane_desc(t) + " waits for lane " +
           std::to_string(l) + ", which waits at __syncthreads() " + where(o.at));
    }
    if (o.state == State::kWarp &&
        (o.at.line != t.at.line || o.at.file != t.at.file || o.mask != t.mask || o.kind != t.kind ||
         o.width != t.width || o.is_shuffle != t.is_shuffle)) {
      fail("block " + str(t.coords.block_idx) +
           ": lanes of a warp meet at different warp operations: " + lane_desc(t) + ", " +
           lane_desc(o));
    }
  }
  fail("block " + str(t.coords.block_idx) + ": " + lane_desc(t) + " cannot complete");
}

void run_block(const uint3& block_idx, const dim3& grid, const dim3& block) {
  Emulator& e = emu();
  const unsigned n = block.x * block.y * block.z;
  e.threads.assign(n, Thread{});
  ++e.block_serial;
  e.shared_used = 0;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    t.linear = i;
    t.coords.thread_idx = {i % block.x, i / block.x % block.y, i / (block.x * block.y)};
    t.coords.block_idx = block_idx;
    t.coords.block_dim = block;
    t.coords.grid_dim = grid;
    t.stack = stack_for(i);
    context_init(t.ctx, t.stack, kStackBytes, &t);
  }
  std::vector<unsigned> ids;
  ids.reserve(n);
  for (;;) {
    ids.clear();
    for (unsigned i = 0; i < n; ++i) {
      if (e.threads[i].state == State::kRunnable) ids.push_back(i);
    }
    shuffle_order(ids);
    for (unsigned i : ids) {
      Thread& t = e.threads[i];
#if !defined(FL_EMU_ASM_SWITCH)
      g_starting = &t;
#endif
      resume(t);
      if (t.error) {
        try {
          std::rethrow_exception(t.error);
        } catch (const Error& err) {
          throw;  // the emulator's own check, already naming the kernel
        } catch (const std::exception& err) {
          fail("block " + str(block_idx) + ", thread " + str(t.coords.thread_idx) +
               " raised: " + err.what());
        } catch (...) {
          fail("block " + str(block_idx) + ", thread " + str(t.coords.thread_idx) +
               " raised an exception");
        }
      }
    }
    if (resolve_warps(e.threads)) continue;
    const Thread* waiting = nullptr;
    size_t exited = 0, at_barrier = 0;
    for (const Thread& t : e.threads) {
      if (t.state == State::kWarp) fail_stuck_warp(e.threads, t);
      if (t.state == State::kExited) ++exited;
      if (t.state == State::kBarrier) {
        ++at_barrier;
        if (waiting == nullptr) waiting = &t;
      }
    }
    if (at_barrier == 0) return;  // every thread has exited
    if (exited > 0) {
      fail("block " + str(block_idx) + ": " + std::to_string(exited) + " thread(s) exited while " +
           std::to_string(at_barrier) + " wait at __syncthreads() " + where(waiting->at));
    }
    for (const Thread& t : e.threads) {
      if (t.at.line != waiting->at.line || t.at.file != waiting->at.file) {
        fail("block " + str(block_idx) + ": threads wait at different barriers: thread " +
             str(waiting->coords.thread_idx) + " at __syncthreads() " + where(waiting->at) +
             ", thread " + str(t.coords.thread_idx) + " at __syncthreads() " + where(t.at));
      }
    }
    for (Thread& t : e.threads) t.state = State::kRunnable;
  }
}

void check_launch(dim3 grid, dim3 block, size_t smem) {
  const auto bad = [](const std::string& why) {
    fail("invalid launch configuration (cudaErrorInvalidConfiguration): " + why);
  };
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) {
    bad("empty grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
        std::to_string(grid.z) + ")");
  }
  if (grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    bad("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " +
        std::to_string(grid.z) + ") exceeds (2^31 - 1, 65535, 65535)");
  }
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 ||
      block.z > 64 || uint64_t(block.x) * block.y * block.z > kMaxThreads) {
    bad("block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
        std::to_string(block.z) +
        "): CUDA allows at most 1024 threads per block and (1024, 1024, 64) per dimension");
  }
  if (smem > kSharedLimit) {
    bad(std::to_string(smem) + " bytes of dynamic shared memory exceed 48 KiB (no opt-in)");
  }
}

}  // namespace

extern "C" void fl_emu_fiber_main(Thread* t) {
  try {
    (*emu().body)();
  } catch (...) {
    t->error = std::current_exception();
  }
  t->state = State::kExited;
  yield_to_scheduler();
  __builtin_trap();  // an exited fiber is never resumed
}

void set_order(Order order, uint64_t seed) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.order = order;
  e.rng.seed(seed);
}

Counters counters() {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  return e.totals;
}

void launch(const char* kernel, Loc at, dim3 grid, dim3 block, size_t dynamic_smem,
            const std::function<void()>& body) {
  if (current != nullptr) throw Error("CUDA emulator: a launch from inside a kernel");
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.kernel = kernel;
  // FL_LAUNCH's name of a template kernel comes in the parentheses that protect its commas.
  if (e.kernel.size() > 1 && e.kernel.front() == '(' && e.kernel.back() == ')') {
    e.kernel = e.kernel.substr(1, e.kernel.size() - 2);
  }
  e.launched_at = at;
  e.body = &body;
  e.dynamic_smem = dynamic_smem;
  check_launch(grid, block, dynamic_smem);
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  e.totals.launches += 1;
  e.totals.threads += nblocks * block.x * block.y * block.z;
  std::vector<uint64_t> order(nblocks);
  std::iota(order.begin(), order.end(), uint64_t(0));
  if (e.order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (e.order == Order::kShuffle) std::shuffle(order.begin(), order.end(), e.rng);
  for (uint64_t b : order) {
    const uint3 idx{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
    run_block(idx, grid, block);
  }
}

void syncthreads(Loc at) {
  Thread& t = calling_thread("__syncthreads()");
  t.state = State::kBarrier;
  t.at = at;
  yield_to_scheduler();
}

namespace {
void warp_op(Thread& t, Loc at, unsigned mask, const char* what) {
  if (!(mask >> lane_of(t) & 1u)) {
    fail("block " + str(t.coords.block_idx) + ": warp " + std::to_string(warp_of(t)) + " lane " +
         std::to_string(lane_of(t)) + " calls " + what + " " + where(at) + " outside its mask " +
         hex(mask));
  }
  t.state = State::kWarp;
  t.at = at;
  t.mask = mask;
  yield_to_scheduler();
}
}  // namespace

void syncwarp(Loc at, unsigned mask) {
  Thread& t = calling_thread("__syncwarp()");
  t.is_shuffle = false;
  t.kind = Shfl::kIdx;
  t.width = 32;
  warp_op(t, at, mask, "__syncwarp");
}

uint64_t shfl_bits(Loc at, Shfl kind, unsigned mask, uint64_t bits, int arg, int width) {
  Thread& t = calling_thread("a warp shuffle");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fail("block " + str(t.coords.block_idx) + ": shuffle width " + std::to_string(width) + " at " +
         where(at) + " is not a power of 2 up to 32");
  }
  t.is_shuffle = true;
  t.kind = kind;
  t.arg = arg;
  t.width = width;
  t.in = bits;
  warp_op(t, at, mask, op_name(t));
  return t.out;
}

void check_aligned(const void* p, size_t bytes, Loc at) {
  if (reinterpret_cast<uintptr_t>(p) % bytes == 0) return;
  const Thread& t = calling_thread("a vector access");
  std::ostringstream addr;
  addr << p;
  fail("block " + str(t.coords.block_idx) + ", thread " + str(t.coords.thread_idx) +
       ": misaligned address (cudaErrorMisalignedAddress): a " + std::to_string(bytes) +
       "-byte access at " + where(at) + " to " + addr.str());
}

void* shared_bytes(SharedSlot& slot, size_t bytes, size_t align, Loc at) {
  Emulator& e = emu();
  if (slot.block != e.block_serial) {
    const size_t offset = (e.shared_used + align - 1) / align * align;
    if (offset + bytes + e.dynamic_smem > kSharedLimit) {
      fail("shared memory at " + where(at) + ": " + std::to_string(offset + bytes) +
           " bytes static plus " + std::to_string(e.dynamic_smem) +
           " dynamic exceed 48 KiB (no opt-in)");
    }
    std::memset(e.shared + offset, 0xff, bytes);  // NaN in every floating type
    slot.ptr = e.shared + offset;
    slot.block = e.block_serial;
    e.shared_used = offset + bytes;
  }
  return slot.ptr;
}

}  // namespace cuda_emu

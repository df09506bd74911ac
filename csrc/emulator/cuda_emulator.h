// A small emulator of CUDA's execution model, so that the CUDA kernels of csrc/cuda compile with
// the host C++ compiler and run on the CPU (the emulated build, FUSED_LSTM_EMULATED).
//
// What it models, exactly where our kernels depend on it:
//   - a launch runs its blocks one after another on the calling OS thread; each thread of a
//     block is a fiber with its own stack and sees threadIdx, blockIdx, blockDim, gridDim;
//   - __syncthreads() releases when every live thread of the block has arrived; a thread that
//     exits while others wait, or threads waiting at different barriers, is an error;
//   - warp shuffles and __syncwarp meet the lanes named in the mask, with CUDA's width and
//     segment rules; a lane outside its own mask, or a mask naming an exited lane, is an error;
//   - CUDA's launch limits (block and grid dimensions, 48 KiB of shared memory);
//   - vector accesses (FL_LOAD_VEC) fault unless aligned to their size, as on a GPU;
//   - block-shared memory (FL_SHARED_ARRAY), filled with 0xff bytes (NaN in every floating type)
//     at each block's start, so a read before any write shows up;
//   - the order of a launch's blocks, and of the runnable threads between two synchronisation
//     points, is forward, reverse or a seeded shuffle (set_order), so a race shows up as a
//     difference between two runs.
// Errors are thrown as cuda_emu::Error (a std::runtime_error) from launch(), naming the kernel
// and the source line; the emulator stays usable afterwards.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <type_traits>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)

namespace cuda_emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Loc {
  const char* file;
  int line;
};

enum class Order { kForward, kReverse, kShuffle };
void set_order(Order order, uint64_t seed);

// Totals since the process started: kernel launches, and threads run by them.
struct Counters {
  uint64_t launches, threads;
};
Counters counters();

// Runs body once per thread of grid x block (after CUDA's launch checks); `kernel` names it in
// errors, `at` is the launch's source line.
void launch(const char* kernel, Loc at, dim3 grid, dim3 block, size_t dynamic_smem,
            const std::function<void()>& body);

// The current thread's coordinates.
struct Coords {
  uint3 thread_idx, block_idx;
  dim3 block_dim, grid_dim;
};
extern thread_local const Coords* current;

void syncthreads(Loc at);
void syncwarp(Loc at, unsigned mask = 0xffffffffu);

enum class Shfl { kIdx, kUp, kDown, kXor };
// The lane's value as raw bits (up to 8 bytes); returns the source lane's bits.
uint64_t shfl_bits(Loc at, Shfl kind, unsigned mask, uint64_t bits, int arg, int width);

template <typename T>
T shfl(Loc at, Shfl kind, unsigned mask, T var, int arg, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl_bits(at, kind, mask, bits, arg, width);
  std::memcpy(&var, &bits, sizeof(T));
  return var;
}

// Fails unless p is aligned to `bytes`, as a GPU's vector access of that size requires.
void check_aligned(const void* p, size_t bytes, Loc at);

template <typename V>
V load_vec(const V* p, Loc at) {
  check_aligned(p, sizeof(V), at);
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// Block-shared storage of one FL_SHARED_ARRAY declaration: the block's arena slice, handed out
// by the first thread of each block to reach the declaration.
struct SharedSlot {
  uint64_t block = 0;
  void* ptr = nullptr;
};
void* shared_bytes(SharedSlot& slot, size_t bytes, size_t align, Loc at);

// 16-byte aligned at least, as FL_SHARED_ARRAY is in the CUDA build.
template <typename T>
T* shared_array(SharedSlot& slot, size_t n, Loc at) {
  return static_cast<T*>(shared_bytes(slot, n * sizeof(T), alignof(T) > 16 ? alignof(T) : 16, at));
}

}  // namespace cuda_emu

#define threadIdx (::cuda_emu::current->thread_idx)
#define blockIdx (::cuda_emu::current->block_idx)
#define blockDim (::cuda_emu::current->block_dim)
#define gridDim (::cuda_emu::current->grid_dim)
constexpr int warpSize = 32;

#define FL_EMU_HERE (::cuda_emu::Loc{__FILE__, __LINE__})
#define __syncthreads() ::cuda_emu::syncthreads(FL_EMU_HERE)
#define __syncwarp(...) ::cuda_emu::syncwarp(FL_EMU_HERE __VA_OPT__(, ) __VA_ARGS__)
#define __shfl_sync(mask, ...) \
  ::cuda_emu::shfl(FL_EMU_HERE, ::cuda_emu::Shfl::kIdx, mask, __VA_ARGS__)
#define __shfl_up_sync(mask, ...) \
  ::cuda_emu::shfl(FL_EMU_HERE, ::cuda_emu::Shfl::kUp, mask, __VA_ARGS__)
#define __shfl_down_sync(mask, ...) \
  ::cuda_emu::shfl(FL_EMU_HERE, ::cuda_emu::Shfl::kDown, mask, __VA_ARGS__)
#define __shfl_xor_sync(mask, ...) \
  ::cuda_emu::shfl(FL_EMU_HERE, ::cuda_emu::Shfl::kXor, mask, __VA_ARGS__)

// `__shared__ T name[n];` in the CUDA build. GCC ignores section attributes on the static locals
// of templates, so the emulator cannot find and poison plain static arrays: name is a pointer
// into the block's shared arena instead.
#define FL_SHARED_ARRAY(T, name, n)              \
  static ::cuda_emu::SharedSlot name##_emu_slot; \
  T* const name = ::cuda_emu::shared_array<T>(name##_emu_slot, (n), FL_EMU_HERE)
#define FL_LOAD_VEC(...) (::cuda_emu::load_vec((__VA_ARGS__), FL_EMU_HERE))
// Blocks of a launch run only after the previous launch has finished: nothing to wait for.
#define FL_WAIT_PRIOR_GRIDS() ((void)0)
#define FL_RELEASE_DEPENDENTS() ((void)0)

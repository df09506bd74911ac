// Everything the CUDA backend (lstm_cuda.cu, and the step kernels and loops it calls:
// step_kernels.cuh, step_loops.cuh) needs from a real GPU runtime, behind one small interface
// with two implementations: CUDA's (nvcc build) and the emulator's (FUSED_LSTM_EMULATED, host
// compiler, csrc/emulator). Everything else, kernels and host code alike, is compiled unchanged
// by both. The emulated build replaces exactly:
//   - the launch `kernel<<<grid, block, smem, stream>>>(args)` + C10_CUDA_KERNEL_LAUNCH_CHECK by
//     cuda_emu::launch (same grid and block, same checks, run on the CPU);
//   - __shared__ arrays (FL_SHARED_ARRAY) by the emulator's block-shared arena;
//   - the current CUDA stream and the CUDAGuard by nothing (the work is synchronous on the
//     calling thread);
//   - a 16-byte vector access (FL_LOAD_VEC) by a copy that first checks the alignment a GPU
//     requires;
//   - programmatic dependent launch (FL_LAUNCH_CHAINED, FL_WAIT_PRIOR_GRIDS,
//     FL_RELEASE_DEPENDENTS) by plain launches and no-ops: the emulator runs a launch only after
//     the previous one has finished, which is what the wait guarantees on a GPU;
//   - the check that input is a CUDA tensor by one that it is a CPU tensor: the ATen calls
//     around the kernels (cuBLAS GEMMs on the GPU) then run ATen's CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#if defined(FUSED_LSTM_EMULATED)
#include "../emulator/cuda_emulator.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
// 16-byte aligned, so that the kernels can read it as Vec (LDS.128).
#define FL_SHARED_ARRAY(T, name, n) __shared__ alignas(16) T name[n]
#define FL_LOAD_VEC(...) (*(__VA_ARGS__))
// Programmatic dependent launch (sm_90): a chained launch may start while the previous kernel
// of the stream still runs; its threads wait here until that kernel has finished and its writes
// are visible. Everything before the wait may read only what the previous kernel does not write.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FL_WAIT_PRIOR_GRIDS() asm volatile("griddepcontrol.wait;" ::: "memory")
#define FL_RELEASE_DEPENDENTS() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#else
#define FL_WAIT_PRIOR_GRIDS() ((void)0)
#define FL_RELEASE_DEPENDENTS() ((void)0)
#endif
#endif

namespace fused_lstm {
namespace gpu {

// N elements read as one access; the kernels use 16-byte ones (LDG.128, LDS.128).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

}  // namespace gpu
}  // namespace fused_lstm

namespace fused_lstm {
namespace gpu {

#if defined(FUSED_LSTM_EMULATED)
using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline void check_device(const at::Tensor& input) {
  TORCH_CHECK(input.is_cpu(),
              "fused_lstm: input must be a CPU tensor for the emulated CUDA backend, got ",
              input.device());
}
inline bool can_chain_launches() { return true; }

template <typename... Params, typename... Args>
void launch(const char* name, const char* file, int line, void (*kernel)(Params...), dim3 grid,
            dim3 block, size_t smem, Stream, Args&&... args) {
  cuda_emu::launch(name, {file, line}, grid, block, smem, [&] { kernel(args...); });
}

template <typename... Params, typename... Args>
void launch_chained(bool, const char* name, const char* file, int line, void (*kernel)(Params...),
                    dim3 grid, dim3 block, size_t smem, Stream stream, Args&&... args) {
  launch(name, file, line, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
}
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline void check_device(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "fused_lstm: input must be a CUDA tensor, got ", input.device());
}
// Programmatic dependent launch needs sm_90; older devices get plain launches.
inline bool can_chain_launches() { return at::cuda::getCurrentDeviceProperties()->major >= 9; }

template <typename... Params, typename... Args>
void launch(const char*, const char*, int, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t smem, Stream stream, Args&&... args) {
  // clang-format off: it reads the launch's chevrons in a .h as templates' closing brackets.
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A launch that may overlap the tail of the stream's previous kernel (programmatic dependent
// launch) where `chain` is set: the kernel must call FL_WAIT_PRIOR_GRIDS before it reads
// anything that kernel writes. It is captured into CUDA graphs as a programmatic edge.
template <typename... Params, typename... Args>
void launch_chained(bool chain, const char* name, const char* file, int line,
                    void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Stream stream,
                    Args&&... args) {
  if (!chain)
    return launch(name, file, line, kernel, grid, block, smem, stream, std::forward<Args>(args)...);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}
#endif

}  // namespace gpu
}  // namespace fused_lstm

// kernel<<<grid, block, smem, stream>>>(...) and its launch check. A kernel name with template
// arguments goes in parentheses (a macro argument cannot hold its commas).
#define FL_LAUNCH(kernel, grid, block, smem, stream, ...)                                   \
  ::fused_lstm::gpu::launch(#kernel, __FILE__, __LINE__, kernel, grid, block, smem, stream, \
                            __VA_ARGS__)
// The same with launch_chained's `chain`.
#define FL_LAUNCH_CHAINED(chain, kernel, grid, block, smem, stream, ...)                           \
  ::fused_lstm::gpu::launch_chained(chain, #kernel, __FILE__, __LINE__, kernel, grid, block, smem, \
                                    stream, __VA_ARGS__)

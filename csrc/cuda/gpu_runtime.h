// Everything lstm_cuda.cu needs from a real GPU runtime, behind one small interface with two
// implementations: CUDA's (nvcc build) and the emulator's (FUSED_LSTM_EMULATED, host compiler,
// csrc/emulator). Everything else in lstm_cuda.cu, kernels and host code alike, is compiled
// unchanged by both. The emulated build replaces exactly:
//   - the launch `kernel<<<grid, block, smem, stream>>>(args)` + C10_CUDA_KERNEL_LAUNCH_CHECK by
//     cuda_emu::launch (same grid and block, same checks, run on the CPU);
//   - __shared__ arrays (FL_SHARED_ARRAY) by the emulator's block-shared arena;
//   - the current CUDA stream, the CUDAGuard and pinned host memory by nothing (the work is
//     synchronous on the calling thread);
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
#define FL_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#endif

namespace fused_lstm {
namespace gpu {

#if defined(FUSED_LSTM_EMULATED)
using Stream = int;
inline Stream current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
inline void check_device(const at::Tensor& input) {
  TORCH_CHECK(input.is_cpu(), "fused_lstm: input must be a CPU tensor for the emulated CUDA "
              "backend, got ", input.device());
}
inline at::TensorOptions host_staging() { return at::TensorOptions(); }

template <typename... Params, typename... Args>
void launch(const char* name, const char* file, int line, void (*kernel)(Params...), dim3 grid,
            dim3 block, size_t smem, Stream, Args&&... args) {
  cuda_emu::launch(name, {file, line}, grid, block, smem, [&] { kernel(args...); });
}
#else
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
inline void check_device(const at::Tensor& input) {
  TORCH_CHECK(input.is_cuda(), "fused_lstm: input must be a CUDA tensor, got ", input.device());
}
// Pinned, so that a host-to-device copy is asynchronous on the current stream (the caching host
// allocator keeps the buffer alive until the copy has run).
inline at::TensorOptions host_staging() { return at::TensorOptions().pinned_memory(true); }

template <typename... Params, typename... Args>
void launch(const char*, const char*, int, void (*kernel)(Params...), dim3 grid, dim3 block,
            size_t smem, Stream stream, Args&&... args) {
  kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

}  // namespace gpu
}  // namespace fused_lstm

// kernel<<<grid, block, smem, stream>>>(...) and its launch check. A kernel name with template
// arguments goes in parentheses (a macro argument cannot hold its commas).
#define FL_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::fused_lstm::gpu::launch(#kernel, __FILE__, __LINE__, kernel, grid, block, smem, stream, __VA_ARGS__)

// The emulator's test kernels (see selftest_kernels.h). Each writes what its threads saw into
// a float32 CPU tensor, so the tests compare it with what CUDA would produce.
#include "selftest_kernels.h"

#include "../cuda/gpu_runtime.h"

namespace fused_lstm {
namespace emulator_selftest {
namespace {

constexpr int kN = 64;

// Reverses 64 values through shared memory. With the barrier it is correct in every order;
// without it a thread may read its partner's slot before the partner wrote it.
template <bool kBarrier>
__global__ void reverse_kernel(const float* in, float* out) {
  FL_SHARED_ARRAY(float, s, kN);
  const unsigned i = threadIdx.x;
  s[i] = in[blockIdx.x * kN + i];
  if (kBarrier) __syncthreads();
  out[blockIdx.x * kN + i] = s[kN - 1 - i];
}

// What shared memory holds before any write: poison (NaN).
__global__ void read_unwritten_kernel(float* out) {
  FL_SHARED_ARRAY(float, s, kN);
  out[threadIdx.x] = s[threadIdx.x];
}

// Threads of one block wait at two different __syncthreads().
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 16) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// Thread 0 exits while the others wait at a barrier.
__global__ void exit_at_barrier_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Every shuffle kind, full warp and width 8: out[k * 64 + thread] for op k (two warps).
__global__ void shuffles_kernel(float* out) {
  const unsigned t = threadIdx.x;
  const float v = static_cast<float>(t);
  float* o = out;
  o[0 * kN + t] = __shfl_sync(0xffffffffu, v, 3);
  o[1 * kN + t] = __shfl_sync(0xffffffffu, v, 5, 8);
  o[2 * kN + t] = __shfl_up_sync(0xffffffffu, v, 2);
  o[3 * kN + t] = __shfl_up_sync(0xffffffffu, v, 3, 8);
  o[4 * kN + t] = __shfl_down_sync(0xffffffffu, v, 2);
  o[5 * kN + t] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[6 * kN + t] = __shfl_xor_sync(0xffffffffu, v, 1);
  o[7 * kN + t] = __shfl_xor_sync(0xffffffffu, v, 12, 8);
  float sum = v;  // a butterfly reduction, the rounds the LSTM kernels' reduce-scatter makes
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  o[8 * kN + t] = sum;
  // Half warps with their own masks; doubles go through the same path.
  const unsigned half = (t % 32) < 16 ? 0x0000ffffu : 0xffff0000u;
  o[9 * kN + t] = static_cast<float>(__shfl_down_sync(half, static_cast<double>(v), 1, 16));
}

// Lanes exchange through shared memory, ordered by __syncwarp.
__global__ void syncwarp_kernel(float* out) {
  FL_SHARED_ARRAY(float, s, 32);
  const unsigned lane = threadIdx.x % 32;
  s[lane] = static_cast<float>(lane);
  __syncwarp();
  out[threadIdx.x] = s[31 - lane];
}

// Lane 5 calls a shuffle whose mask leaves it out.
__global__ void out_of_mask_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask = lane == 5 ? 0x0000000fu : 0xffffffdfu;
  out[threadIdx.x] = __shfl_xor_sync(mask, 1.0f, 0);
}

// The upper half warp exits; the lower half names it in the mask.
__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// The lower half warp reads lane 20, which is not in its mask.
__global__ void wrong_source_kernel(float* out) {
  const unsigned lane = threadIdx.x % 32;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_sync(mask, static_cast<float>(lane), 20);
}

// Thread 7 fails a TORCH_CHECK.
__global__ void throwing_kernel(float* out) {
  TORCH_CHECK(threadIdx.x != 7, "planted failure in thread ", threadIdx.x);
  out[threadIdx.x] = 1.0f;
}

// Too much static shared memory (ptxas would refuse it too).
__global__ void big_shared_kernel(float* out) {
  FL_SHARED_ARRAY(float, s, 12 * 1024 + 1);
  s[threadIdx.x] = 0.0f;
  out[threadIdx.x] = s[threadIdx.x];
}

// Records each thread's coordinates: out[linear thread of the grid * 6 + k].
__global__ void coords_kernel(float* out) {
  const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned per = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  float* o = out + (block * per + t) * 6;
  o[0] = threadIdx.x, o[1] = threadIdx.y, o[2] = threadIdx.z;
  o[3] = blockIdx.x, o[4] = blockIdx.y, o[5] = blockIdx.z;
}

// Copies 64 floats with 16-byte loads from in + offset: aligned at offset 0, and at offset 1 a
// misaligned access, which faults on a GPU.
__global__ void vector_load_kernel(const float* in, int offset, float* out) {
  const unsigned i = threadIdx.x;
  const gpu::Vec<float, 4> v =
      FL_LOAD_VEC(reinterpret_cast<const gpu::Vec<float, 4>*>(in + offset + 4 * i));
  for (int e = 0; e < 4; ++e) out[4 * i + e] = v.v[e];
}

at::Tensor zeros(int64_t n) { return at::zeros({n}, at::kFloat); }

}  // namespace

void define(pybind11::module m) {
  const gpu::Stream s = gpu::current_stream();
  m.def("reverse", [s](const at::Tensor& in, bool barrier) {
    TORCH_CHECK(in.dtype() == at::kFloat && in.is_contiguous() && in.numel() % kN == 0);
    at::Tensor out = at::empty_like(in);
    const unsigned blocks = static_cast<unsigned>(in.numel() / kN);
    if (barrier) {
      FL_LAUNCH(reverse_kernel<true>, blocks, kN, 0, s, in.const_data_ptr<float>(),
                out.data_ptr<float>());
    } else {
      FL_LAUNCH(reverse_kernel<false>, blocks, kN, 0, s, in.const_data_ptr<float>(),
                out.data_ptr<float>());
    }
    return out;
  });
  // Kernels of one float output of `threads` entries per block, launched as given.
  using Kernel = void (*)(float*);
  static const std::pair<const char*, Kernel> kKernels[] = {
      {"read_unwritten", &read_unwritten_kernel},
      {"divergent_barrier", &divergent_barrier_kernel},
      {"exit_at_barrier", &exit_at_barrier_kernel},
      {"syncwarp", &syncwarp_kernel},
      {"out_of_mask", &out_of_mask_kernel},
      {"exited_lane", &exited_lane_kernel},
      {"wrong_source", &wrong_source_kernel},
      {"throwing", &throwing_kernel},
      {"big_shared", &big_shared_kernel}};
  for (const auto& [name, kernel] : kKernels) {
    m.def(name, [s, name = name, kernel = kernel](unsigned threads) {
      at::Tensor out = zeros(threads);
      gpu::launch(name, __FILE__, __LINE__, kernel, 1, threads, 0, s, out.data_ptr<float>());
      return out;
    });
  }
  m.def("vector_load", [s](const at::Tensor& in, int offset) {
    TORCH_CHECK(in.dtype() == at::kFloat && in.is_contiguous() && in.numel() >= kN + offset);
    at::Tensor out = zeros(kN);
    FL_LAUNCH(vector_load_kernel, 1, kN / 4, 0, s, in.const_data_ptr<float>(), offset,
              out.data_ptr<float>());
    return out;
  });
  m.def("shuffles", [s] {
    at::Tensor out = zeros(10 * kN);
    FL_LAUNCH(shuffles_kernel, 1, kN, 0, s, out.data_ptr<float>());
    return out.view({10, kN});
  });
  m.def("coords", [s](std::array<unsigned, 3> g, std::array<unsigned, 3> b, size_t smem) {
    const int64_t n = int64_t(g[0]) * g[1] * g[2] * b[0] * b[1] * b[2];
    at::Tensor out = zeros(n * 6);
    FL_LAUNCH(coords_kernel, dim3(g[0], g[1], g[2]), dim3(b[0], b[1], b[2]), smem, s,
              out.data_ptr<float>());
    return out.view({n, 6});
  });
}

}  // namespace emulator_selftest
}  // namespace fused_lstm

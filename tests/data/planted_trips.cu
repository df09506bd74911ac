// Planted kernels for the SASS check (benchmarks/cuda_resources.py; tests/test_cuda_kernels.py):
// one loop over tiles of kLoads loads each, after griddepcontrol.wait as in the step kernels.

constexpr int kLoads = 4;

// Each load is consumed at once by a store, and out may alias x, so nvcc cannot issue the next
// load before that store: a trip per load, kLoads per tile. The check must flag it.
extern "C" __global__ void consumed_at_once(const float* x, float* out, int tiles) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
#pragma unroll 1
  for (int t = 0; t < tiles; ++t) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int k = (t * kLoads + i) * blockDim.x + threadIdx.x;
      out[k] = x[k] * 2.0f;
    }
  }
}

// The same loads, all issued before the first is consumed: one trip per tile.
extern "C" __global__ void hoisted(const float* __restrict__ x, float* __restrict__ out,
                                   int tiles) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
#pragma unroll 1
  for (int t = 0; t < tiles; ++t) {
    float v[kLoads];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) v[i] = x[(t * kLoads + i) * blockDim.x + threadIdx.x];
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      out[(t * kLoads + i) * blockDim.x + threadIdx.x] = v[i] * 2.0f;
    }
  }
}

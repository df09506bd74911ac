// Cost of the CUDA emulator's thread switches (csrc/emulator): one block of 256 threads doing
// 80 warp shuffles and 2 barriers each, about what one step of the LSTM kernels does. Build
// and run with the hand-written x86-64 switch, then with the portable ucontext one:
//   g++ -O1 -std=c++20 -Icsrc benchmarks/emulator_switch.cpp csrc/emulator/emulator.cpp -o /tmp/sw
//   && /tmp/sw g++ -O1 -std=c++20 -DFL_EMU_UCONTEXT -Icsrc benchmarks/emulator_switch.cpp
//   csrc/emulator/emulator.cpp -o /tmp/sw && /tmp/sw
#include <chrono>
#include <cstdio>

#include "emulator/cuda_emulator.h"

__global__ void step_like(float* out) {
  float v = static_cast<float>(threadIdx.x);
  __syncthreads();
  for (int r = 0; r < 16; ++r) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  __syncthreads();
  out[threadIdx.x] = v;
}

int main() {
  static float out[256];
  constexpr int kLaunches = 200;
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < kLaunches; ++i) {
    cuda_emu::launch("step_like", FL_EMU_HERE, 1, 256, 0, [&] { step_like(out); });
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double switches = 2.0 * kLaunches * 256 * (16 * 5 + 2);
  std::printf("%.1f us per launch, %.1f ns per switch (%d launches of 256 threads)\n",
              s / kLaunches * 1e6, s / switches * 1e9, kLaunches);
  // Each round sums the warp: warp w ends at sum(32w .. 32w + 31) * 32^15, exact in float.
  for (int t = 0; t < 256; ++t) {
    const int w = t / 32;
    const float want = static_cast<float>(32 * w * 32 + 496) * 0x1p75f;
    if (out[t] != want) {
      std::printf("thread %d: %g, want %g\n", t, out[t], want);
      return 1;
    }
  }
  return 0;
}

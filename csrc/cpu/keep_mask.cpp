// The kernels of fused_lstm::keep_mask, the regularisers' masks: the CPU's own, and bernoulli_
// for every other device.
//
// bernoulli_ on the CPU runs mt19937 per element, 4-7 ns a draw on our machines: a zoneout mask
// then costs more than the seed-sized LSTM step it is for (0.7 ns of arithmetic per unit). Here
// one 64-bit seed comes from torch's CPU generator (so torch.manual_seed reproduces the mask, and
// the generator advances) and SplitMix64 (Steele, Lea and Flood 2014; it passes BigCrush) expands
// it: output j is a hash of seed + (j + 1) * golden, whose two 32-bit halves decide two
// elements. Being counter-based, the mask does not depend on how the elements are split across
// threads.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>

#include "isa.h"

namespace fused_lstm {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ull;

inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The element type's bits, to select `value` or 0 (all bits clear, in every floating type) by a
// mask rather than a branch, which would mispredict at random: at prob 0.5 the branching loop
// took 6x as long.
template <size_t N>
struct BitsOf;
template <>
struct BitsOf<2> {
  using type = uint16_t;
};
template <>
struct BitsOf<4> {
  using type = uint32_t;
};
template <>
struct BitsOf<8> {
  using type = uint64_t;
};

// `on` where the 32-bit draw u keeps (u < threshold), else 0.
template <class Bits>
inline Bits kept(uint64_t u, uint64_t threshold, Bits on) {
  return on & static_cast<Bits>(-static_cast<Bits>(u < threshold));
}

// Elements [2 j0, 2 j1) of the mask, two per hash: compiled per ISA (isa.h), the loop
// vectorises where the ISA has 64-bit multiplies (AVX-512: 0.16 ns an element here, against 0.7
// for the baseline x86-64 build, standalone timings).
template <class Bits>
struct FillPairs {
  template <CpuIsa>
  static FL_ISA_BODY void run(Bits* __restrict p, int64_t j0, int64_t j1, uint64_t seed,
                              uint64_t threshold, Bits on) {
    for (int64_t j = j0; j < j1; ++j) {
      const uint64_t z = splitmix64(seed + static_cast<uint64_t>(j + 1) * kGolden);
      p[2 * j] = kept(z & 0xFFFFFFFFull, threshold, on);
      p[2 * j + 1] = kept(z >> 32, threshold, on);
    }
  }
};

template <class T>
void fill(T* out, int64_t n, uint64_t seed, uint64_t threshold, T value) {
  using Bits = typename BitsOf<sizeof(T)>::type;
  Bits on;
  std::memcpy(&on, &value, sizeof on);
  Bits* p = reinterpret_cast<Bits*>(out);
  at::parallel_for(0, n / 2, 1 << 15, [&](int64_t begin, int64_t end) {
    run_on_cpu_isa<FillPairs<Bits>>(p, begin, end, seed, threshold, on);
  });
  if (n % 2) {  // the last element: the low half of one more hash
    const uint64_t z = splitmix64(seed + static_cast<uint64_t>(n / 2 + 1) * kGolden);
    p[n - 1] = kept(z & 0xFFFFFFFFull, threshold, on);
  }
}

uint64_t draw_seed() {
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      std::nullopt, at::detail::getDefaultCPUGenerator());
  const std::lock_guard<std::mutex> lock(gen->mutex_);
  return gen->random64();
}

at::Tensor keep_mask_cpu(const at::Tensor& like, at::IntArrayRef size, double prob, double value) {
  TORCH_CHECK(prob >= 0 && prob <= 1, "fused_lstm: keep_mask's prob must be in [0, 1], got ", prob);
  at::Tensor out = at::empty(size, like.options());
  const int64_t n = out.numel();
  if (n == 0) return out;
  const uint64_t seed = draw_seed();
  // A 32-bit draw u keeps where u < prob * 2^32: probability prob to within 2^-32.
  const uint64_t threshold = static_cast<uint64_t>(std::ldexp(prob, 32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "keep_mask", [&] {
    fill(out.data_ptr<scalar_t>(), n, seed, threshold, static_cast<scalar_t>(value));
  });
  return out;
}

// keep_mask's kernel where the device has none of its own: bernoulli_, a counter-based
// generator in the kernel on CUDA.
at::Tensor keep_mask_composite(const at::Tensor& like, c10::SymIntArrayRef size, double prob,
                               double value) {
  return at::empty_symint(size, like.options()).bernoulli_(prob).mul_(value);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) { m.impl("keep_mask", &keep_mask_cpu); }

TORCH_LIBRARY_IMPL(fused_lstm, CompositeExplicitAutograd, m) {
  m.impl("keep_mask", &keep_mask_composite);
}

}  // namespace fused_lstm

// Which vector ISA the CPU kernels' loops run in, and the one dispatch that runs them in it.
//
// One build runs everywhere at the machine's widest vectors: on x86-64 each marked kernel is
// compiled three times, for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and baseline x86-64, as thin
// entry points with a target attribute around one always_inline body (a default-target callee may
// be inlined into a target-attributed caller, which is how the body gets the wider ISA while
// ATen's inline code stays compiled for the baseline). The register width is a template parameter
// of the body. The ISA is chosen once, at the first call: the CPU's best, or the one
// FUSED_LSTM_CPU_ISA names, so that every variant can be tested on one machine (GCC's
// target_clones, used before, picks in an ifunc resolver that nothing can override, and the
// baseline clones had never run). Other architectures have one variant, `baseline`, whose width
// is what the compiler targets (16-byte NEON vectors on aarch64).
#pragma once

#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#define FL_X86_64 1
#else
#define FL_X86_64 0
#endif

namespace fused_lstm {

// Widest first: the order of cpu_isas() and of the error messages.
enum class CpuIsa { kAvx512, kAvx2, kBaseline };

// The name FUSED_LSTM_CPU_ISA takes and fused_lstm._C.cpu_isa() returns.
const char* cpu_isa_name(CpuIsa isa);

// The ISAs this build has and this CPU runs, widest first; baseline is always among them.
std::vector<CpuIsa> cpu_isas();

// The best of cpu_isas(), or the one FUSED_LSTM_CPU_ISA names. Throws std::invalid_argument,
// naming the variable, for a value that is not an ISA's name or one this CPU does not run.
CpuIsa choose_cpu_isa();

// choose_cpu_isa() asked once per process. A failed choice is not kept: every kernel call then
// throws the same error (fused_lstm's import already raised it).
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = choose_cpu_isa();
  return isa;
}

// Bytes of a vector register. The baseline's is that of what the compiler targets, so a build
// for a wider machine (-march) or another architecture gets its native width.
constexpr int64_t kBaselineVectorBytes =
#if defined(__AVX512F__)
    64;
#elif defined(__AVX__)
    32;
#else
    16;
#endif

template <CpuIsa Isa>
constexpr int64_t kVectorBytes = Isa == CpuIsa::kAvx512 ? 64
                                 : Isa == CpuIsa::kAvx2 ? 32
                                                        : kBaselineVectorBytes;

// What a kernel's body is: inlined into each ISA's entry point, where it gets that ISA.
#define FL_ISA_BODY inline __attribute__((always_inline))

// A kernel body's pointers are all __restrict, and so are its entry points': once the body is
// inlined, its own qualifiers no longer tell GCC that they do not alias (without these, the
// backward gate math lost vector loops, and with them some roundings: FMA contraction differs
// between its vector and scalar code).
template <class A>
struct Restrict {
  using type = A;
};
template <class P>
struct Restrict<P*> {
  using type = P* __restrict;
};
template <class A>
using restrict_t = typename Restrict<A>::type;

// The entry points of Kernel: Kernel::run<Isa>(args...) compiled for Isa.
#if FL_X86_64
template <class Kernel, class... Args>
__attribute__((target("arch=x86-64-v4"))) void run_avx512(restrict_t<Args>... args) {
  Kernel::template run<CpuIsa::kAvx512>(args...);
}

template <class Kernel, class... Args>
__attribute__((target("arch=x86-64-v3"))) void run_avx2(restrict_t<Args>... args) {
  Kernel::template run<CpuIsa::kAvx2>(args...);
}
#endif

template <class Kernel, class... Args>
void run_baseline(restrict_t<Args>... args) {
  Kernel::template run<CpuIsa::kBaseline>(args...);
}

// Runs Kernel::run<Isa>(args...) for the chosen ISA.
template <class Kernel, class... Args>
inline void run_on_cpu_isa(Args... args) {
#if FL_X86_64
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return run_avx512<Kernel, Args...>(args...);
    case CpuIsa::kAvx2:
      return run_avx2<Kernel, Args...>(args...);
    case CpuIsa::kBaseline:
      break;
  }
#endif
  run_baseline<Kernel, Args...>(args...);
}

}  // namespace fused_lstm

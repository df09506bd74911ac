// The choice of the CPU kernels' ISA (isa.h): the CPU's best, or FUSED_LSTM_CPU_ISA's.
#include "isa.h"

#include <algorithm>
#include <cstdlib>
#include <iterator>
#include <stdexcept>
#include <string>

namespace fused_lstm {
namespace {

constexpr CpuIsa kAllIsas[] = {CpuIsa::kAvx512, CpuIsa::kAvx2, CpuIsa::kBaseline};

// Whether the CPU (and the OS, which must save the wider registers: the builtins check that)
// runs the code compiled for isa: every feature of its x86-64 level that GCC or Clang may emit
// for our loops. The levels' other features (F16C, LZCNT, MOVBE; AVX-512 CD) come with these on
// every CPU that has them.
bool runs(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBaseline:
      return true;
#if FL_X86_64
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
    case CpuIsa::kAvx512:
      return runs(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
#endif
    default:
      return false;
  }
}

std::string names(const std::vector<CpuIsa>& isas) {
  std::string out;
  for (CpuIsa isa : isas) out += (out.empty() ? "" : ", ") + std::string(cpu_isa_name(isa));
  return out;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kBaseline:
      break;
  }
  return "baseline";
}

std::vector<CpuIsa> cpu_isas() {
  std::vector<CpuIsa> out;
  std::copy_if(std::begin(kAllIsas), std::end(kAllIsas), std::back_inserter(out), runs);
  return out;
}

CpuIsa choose_cpu_isa() {
  const std::vector<CpuIsa> here = cpu_isas();
  const char* forced = std::getenv("FUSED_LSTM_CPU_ISA");
  if (forced == nullptr || *forced == '\0') return here.front();
  const std::string value(forced);
  const auto named = std::find_if(std::begin(kAllIsas), std::end(kAllIsas),
                                  [&](CpuIsa isa) { return value == cpu_isa_name(isa); });
  if (named != std::end(kAllIsas) && std::find(here.begin(), here.end(), *named) != here.end()) {
    return *named;
  }
  const std::string what = named == std::end(kAllIsas)
                               ? " names none of the CPU kernels' ISAs (" +
                                     names({std::begin(kAllIsas), std::end(kAllIsas)}) + ")"
                               : ", but this CPU does not run the " + value + " kernels";
  throw std::invalid_argument("fused_lstm: FUSED_LSTM_CPU_ISA=" + value + what +
                              "; this CPU runs: " + names(here) + ". Unset it for the widest.");
}

}  // namespace fused_lstm

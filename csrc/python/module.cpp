// fused_lstm._C: what Python asks of the native library (libfused_lstm.so, the kernels, their
// autograd and the op schemas, csrc/schemas.cpp) and cannot ask through the ops: the CPU
// kernels' tuning constants and ISA. It is linked against the library, so importing it loads the
// library; the library itself has no Python in it, so a C++ program can link it too
// (docs/deploying.md).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <mutex>
#include <set>

#include "../cpu/isa.h"
#include "../cpu/pack_cache.h"
#include "../tuning.h"

namespace fused_lstm {
extern const char kDoubleBackwardError[];  // autograd/kernel_ops.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lstm's native library, as Python asks of it (the ops are torch.ops.fused_lstm)";
  // The error a second backward through the handwritten backwards raises, for the tests to match.
  m.attr("DOUBLE_BACKWARD_ERROR") = pybind11::str(fused_lstm::kDoubleBackwardError);
  // The CPU kernels' thresholds (tuning.h), for the tests that cross them.
  {
    using namespace fused_lstm::tuning;
    pybind11::dict tuning;
    for (const auto& [name, value] : {std::pair{"gemm_work", kGemmWork},
                                      {"direct_gemm_work", kDirectGemmWork},
                                      {"gemm_rows", kGemmRows},
                                      {"parallel_work", kParallelWork},
                                      {"pointwise_weight", kPointwiseWeight},
                                      {"row_split_min_rows", kRowSplitMinRows},
                                      {"row_split_copies", kRowSplitCopies},
                                      {"default_l2_bytes", kDefaultL2Bytes},
                                      {"sweep_bytes", kSweepBytes},
                                      {"panel_bytes", kPanelBytes},
                                      {"pack_copy_elements", kPackCopyElements},
                                      {"small_projection", kSmallProjection},
                                      {"small_grads", kSmallGrads},
                                      {"onednn_work", kOneDnnWork},
                                      {"narrow_columns", kNarrowColumns},
                                      {"pack_cache_bytes", kPackCacheBytes},
                                      {"pack_cache_min_bytes", kPackCacheMinBytes},
                                      {"pack_cache_entries", kPackCacheEntries}}) {
      tuning[name] = value;
    }
    m.attr("TUNING") = tuning;
  }
  // The CPU kernels' ISA (cpu/isa.h). fused_lstm's import asks for it, so that a bad
  // FUSED_LSTM_CPU_ISA is a ValueError there (std::invalid_argument) rather than at a kernel call.
  m.def(
      "cpu_isa", [] { return fused_lstm::cpu_isa_name(fused_lstm::cpu_isa()); },
      "the ISA the CPU kernels run in: avx512, avx2 or baseline");
  m.def(
      "cpu_isas",
      [] {
        pybind11::list names;
        for (const fused_lstm::CpuIsa isa : fused_lstm::cpu_isas()) {
          names.append(fused_lstm::cpu_isa_name(isa));
        }
        return names;
      },
      "the ISAs this build's CPU kernels can run in on this CPU, widest first");
  // The CPU kernels' cache of packed weights (cpu/pack_cache.h), for the tests and for users who
  // bound it or turn it off at run time.
  m.def(
      "pack_cache_stats",
      [] {
        const fused_lstm::PackCacheStats s = fused_lstm::pack_cache_stats();
        pybind11::dict d;
        d["entries"] = s.entries;
        d["packs"] = s.packs;
        d["bytes"] = s.bytes;
        d["capacity"] = s.capacity;
        d["hits"] = s.hits;
        d["misses"] = s.misses;
        d["stores"] = s.stores;
        d["evictions"] = s.evictions;
        return d;
      },
      "the CPU pack cache: entries, packs, bytes, capacity; hits, misses, stores, evictions since "
      "load or the last clear");
  m.def("pack_cache_clear", &fused_lstm::pack_cache_clear, "drops every cached pack");
  m.def("pack_cache_set_capacity", &fused_lstm::pack_cache_set_capacity, pybind11::arg("bytes"),
        "the bound on the packs' bytes; 0 turns the cache off");
  // at::parallel_for is inline: it runs on one thread in a file compiled without OpenMP, which is
  // how the kernels' threaded steps once ran. This file is compiled with the kernels' flags.
  m.def(
      "parallel_for_threads",
      [] {
        std::mutex mutex;
        std::set<int> seen;
        at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
          const std::lock_guard<std::mutex> lock(mutex);
          seen.insert(at::get_thread_num());
        });
        return seen.size();
      },
      "how many threads at::parallel_for runs a split of get_num_threads() pieces on in the "
      "kernels");
}

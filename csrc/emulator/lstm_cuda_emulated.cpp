// The emulated CUDA backend: csrc/cuda/lstm_cuda.cu and its step loops themselves, compiled by
// the host compiler against the emulator (setup.py defines FUSED_LSTM_EMULATED, so gpu_runtime.h
// picks the emulated runtime). Its kernels are registered for the CPU key of the ops of the
// namespace fused_lstm_emulated, which fused_lstm.testing defines from the ops' own schemas;
// fused_lstm.testing.emulated_cuda() routes the fused_lstm ops to them.

#include <torch/extension.h>
#include <torch/library.h>

#include "../cuda/lstm_cuda.cu"
#include "../cuda/step_loops.cuh"
#include "selftest_kernels.h"

FL_CUDA_DTYPES(FL_FORWARD_STEPS)
FL_CUDA_DTYPES(FL_BACKWARD_STEPS)

TORCH_LIBRARY_IMPL(fused_lstm_emulated, CPU, m) {
  fused_lstm::register_layer_ops<fused_lstm::CudaKernels>(m);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lstm's CUDA kernels run on CPU tensors by a CUDA emulator (for tests)";
  m.def(
      "set_order",
      [](const std::string& order, uint64_t seed) {
        static const std::pair<const char*, cuda_emu::Order> kOrders[] = {
            {"forward", cuda_emu::Order::kForward},
            {"reverse", cuda_emu::Order::kReverse},
            {"shuffle", cuda_emu::Order::kShuffle}};
        for (const auto& [name, o] : kOrders) {
          if (order == name) return cuda_emu::set_order(o, seed);
        }
        TORCH_CHECK(false, "order must be 'forward', 'reverse' or 'shuffle', got '", order, "'");
      },
      "Order of a launch's blocks and of a block's runnable threads between two sync points.");
  m.def(
      "counters",
      [] {
        const cuda_emu::Counters c = cuda_emu::counters();
        return std::make_pair(c.launches, c.threads);
      },
      "(launches, threads) since the process started.");
  // The step kernels' tile shapes (step_kernels.cuh, step_loops.cuh), for tests whose sizes
  // must cross them.
  m.def(
      "batch_tile",
      [](at::ScalarType dtype, int64_t batch, bool backward, bool regs) {
        int bt = 0;
        const auto read = [&](auto tile, auto) { bt = decltype(tile)::value; };
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batch_tile", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          namespace cs = fused_lstm::cuda_steps;
          constexpr int kMax = cs::kMaxBatchTile, kForwardMax = cs::kForwardMaxBatchTile<acc_t>;
          backward ? cs::with_tile_and_regs<kMax, kMax>(batch, regs, read)
                   : cs::with_tile_and_regs<kForwardMax, kMax>(batch, regs, read);
        });
        return bt;
      },
      "The batch rows per block (BT) of a direction's step kernels for this dtype and batch size, "
      "with or without regularisers.");
  m.def(
      "tile_columns",
      [](at::ScalarType dtype, int bt, bool backward) {
        int cols = 0;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "tile_columns", [&] {
          fused_lstm::cuda_steps::with_batch_tile<16>(bt, [&](auto tile) {
            using acc_t = at::opmath_type<scalar_t>;
            constexpr int BT = decltype(tile)::value;
            cols = backward ? fused_lstm::Tile<scalar_t, acc_t, BT, 1>::kCols
                            : fused_lstm::Tile<scalar_t, acc_t, BT, 4>::kCols;
          });
        });
        return cols;
      },
      "Columns of the reduction per tile (step_kernels.cuh's Tile) at a batch tile of bt rows.");
  fused_lstm::emulator_selftest::define(m.def_submodule(
      "selftest", "Small kernels, correct and with planted bugs, for the emulator's own tests"));
}

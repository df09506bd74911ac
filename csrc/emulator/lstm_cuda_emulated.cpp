// The emulated CUDA backend: csrc/cuda/lstm_cuda.cu and its step loops (instances/) themselves,
// compiled by the host compiler against the emulator (setup.py defines FUSED_LSTM_EMULATED, so
// gpu_runtime.h picks the emulated runtime), exported to Python as fused_lstm._emulated_cuda.
// fused_lstm.testing.emulated_cuda() routes the ops to it.

#include <torch/extension.h>

#include "../cuda/lstm_cuda.cu"
#include "../cuda/instances/backward_bfloat16.cu"
#include "../cuda/instances/backward_double.cu"
#include "../cuda/instances/backward_float.cu"
#include "../cuda/instances/backward_half.cu"
#include "../cuda/instances/forward_bfloat16.cu"
#include "../cuda/instances/forward_double.cu"
#include "../cuda/instances/forward_float.cu"
#include "../cuda/instances/forward_half.cu"
#include "selftest_kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lstm's CUDA kernels run on CPU tensors by a CUDA emulator (for tests)";
  // The ops' own signatures (fused_lstm/_library.py), called with the dispatcher's positional
  // arguments, which leave out trailing ones equal to their defaults: the regularisers and resets.
  namespace py = pybind11;
  const auto regularisers = [](auto... leading) {
    return std::make_tuple(leading..., py::arg("recurrent_mask") = py::none(),
                           py::arg("zoneout_cell") = py::none(),
                           py::arg("zoneout_hidden") = py::none(), py::arg("reset") = py::none());
  };
  using Kernels = fused_lstm::CudaKernels;
  std::apply([&](auto... a) { m.def("layer_forward", &fused_lstm::layer_forward_op<Kernels>, a...); },
             regularisers(py::arg("input"), py::arg("batch_sizes"), py::arg("h0"), py::arg("c0"),
                          py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"),
                          py::arg("w_hr"), py::arg("reverse")));
  std::apply([&](auto... a) { m.def("layer_backward", &fused_lstm::layer_backward_op<Kernels>, a...); },
             regularisers(py::arg("grad_output"), py::arg("grad_h_n"), py::arg("grad_c_n"),
                          py::arg("input"), py::arg("batch_sizes"), py::arg("h0"), py::arg("c0"),
                          py::arg("w_ih"), py::arg("w_hh"), py::arg("w_hr"), py::arg("output"),
                          py::arg("gates"), py::arg("cells"), py::arg("reverse")));
  m.def("cell_forward", &fused_lstm::cell_forward_op<Kernels>);
  m.def("cell_backward", &fused_lstm::cell_backward_op<Kernels>);
  m.def("set_order", [](const std::string& order, uint64_t seed) {
    static const std::pair<const char*, cuda_emu::Order> kOrders[] = {
        {"forward", cuda_emu::Order::kForward},
        {"reverse", cuda_emu::Order::kReverse},
        {"shuffle", cuda_emu::Order::kShuffle}};
    for (const auto& [name, o] : kOrders) {
      if (order == name) return cuda_emu::set_order(o, seed);
    }
    TORCH_CHECK(false, "order must be 'forward', 'reverse' or 'shuffle', got '", order, "'");
  }, "Order of a launch's blocks and of a block's runnable threads between two sync points.");
  m.def("counters", [] {
    const cuda_emu::Counters c = cuda_emu::counters();
    return std::make_pair(c.launches, c.threads);
  }, "(launches, threads) since the process started.");
  // The step kernels' tile shapes (step_kernels.cuh, step_loops.cuh), for tests whose sizes
  // must cross them.
  m.def("batch_tile", [](at::ScalarType dtype, int64_t batch, bool backward, bool regs) {
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
  }, "The batch rows per block (BT) of a direction's step kernels for this dtype and batch size, "
     "with or without regularisers.");
  m.def("tile_columns", [](at::ScalarType dtype, int bt, bool backward) {
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
  }, "Columns of the reduction per tile (step_kernels.cuh's Tile) at a batch tile of bt rows.");
  fused_lstm::emulator_selftest::define(m.def_submodule(
      "selftest", "Small kernels, correct and with planted bugs, for the emulator's own tests"));
}

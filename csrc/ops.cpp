// The op schemas, declared once. Each device registers its implementation of the four kernel
// ops with TORCH_LIBRARY_IMPL through layer_ops.h's register_layer_ops (cpu/lstm_cpu.cpp,
// cuda/lstm_cuda.cu); the dispatcher picks by device. Their autograd: autograd/kernel_ops.cpp;
// the whole-LSTM op lstm over them: autograd/lstm_op.cpp. Shapes and layouts: see layer_ops.h
// and fused_lstm/reference.py, which implements the same signatures in PyTorch ops.
#include <ATen/Parallel.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <mutex>
#include <set>

#include "cpu/isa.h"
#include "tuning.h"

TORCH_LIBRARY(fused_lstm, m) {
  // One layer, one direction. Returns (output, h_n, c_n, gates, cells); gates and cells are the
  // workspace layer_backward needs.
  //
  // The regularisers and resets, each None for off (layer_ops.h checks them):
  //   recurrent_mask (B, Hr): h_{t-1} of batch row b enters the recurrent product (only) as
  //     h_{t-1} * recurrent_mask[b] (variational recurrent dropout's scaled mask).
  //   zoneout_cell: c_t = d c_{t-1} + (1 - d) (f c_{t-1} + i g), where d is the 0-dim
  //     zoneout_cell itself (a rate, in eval) or its element at c_t's row and unit (a keep mask
  //     shaped like cells, in training); cells saves this c_t.
  //   zoneout_hidden: h_t = d h_{t-1} + (1 - d) h~_t likewise, h~_t the layer's plain output
  //     (after the projection); shaped like output, and output is h_t.
  //   reset (bool, input's shape without the features): where true, the step of that row
  //     starts from zero state instead of the state of the previously visited step (or h0,
  //     c0). The rows are in the order of visit: for reverse = true, the caller passes a row's
  //     flag meaning "no state from the step after it" (lstm does).
  m.def(
      "layer_forward(Tensor input, Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, "
      "Tensor? recurrent_mask=None, Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None, "
      "Tensor? reset=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Handwritten backward of layer_forward. Any incoming gradient may be None (unused output).
  // Returns (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr); grad_bias
  // is the gradient of b_ih and of b_hh alike, grad_w_hr is empty without a projection. The
  // regularisers and resets are the forward's.
  m.def(
      "layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor output, Tensor gates, Tensor cells, bool reverse, Tensor? recurrent_mask=None, "
      "Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None, Tensor? reset=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One step of nn.LSTMCell (no projection): input (B, I), h0 and c0 (B, H). Returns (h, c,
  // gates, cells); gates (B, 4H), the activations i, f, g, o, and cells (B, H), c again, are the
  // workspace cell_backward needs. c and cells are separate tensors so that the caller may
  // modify c in place (as nn.LSTMCell allows on the CPU) without touching the saved state.
  m.def(
      "cell_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh) -> (Tensor, Tensor, Tensor, Tensor)");
  // Handwritten backward of cell_forward; either incoming gradient may be None. Returns
  // (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias), grad_bias as in
  // layer_backward.
  m.def(
      "cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor input, Tensor h0, Tensor c0, "
      "Tensor w_ih, Tensor w_hh, Tensor gates, Tensor cells) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The regularisers' random masks: a tensor of `size` with like's dtype and device, each
  // element `value` with probability `prob` and 0 otherwise, drawn from the generator of like's
  // device. A CPU kernel of its own (cpu/keep_mask.cpp) because bernoulli_'s draws there cost
  // as much per unit as a seed-sized LSTM step; elsewhere it is bernoulli_ (same file).
  m.def("keep_mask(Tensor like, SymInt[] size, float prob, float value) -> Tensor",
        {at::Tag::nondeterministic_seeded});
  // A whole nn.LSTM, like aten::lstm: every layer and direction through layer_forward, with
  // nn.LSTM's dropout between layers (training only, never after the last). input (T, B, I), or
  // packed data (N, I) with batch_sizes; hx (L*D, B, Hr), cx (L*D, B, H); params in nn.LSTM's
  // _flat_weights order. Returns (output, h_n, c_n). Its kernel and autograd: autograd/lstm_op.cpp.
  //
  // The regularisers (docs/regularisers.md), drawn from the generator of input's
  // device in training: recurrent_dropout (one mask per call, layer, direction and batch row),
  // zoneout_cell and zoneout_hidden (rates; per step and unit masks in training, the
  // expectation in eval), weight_drop (DropConnect on each w_hh, one mask per call). reset
  // (bool, input's shape without the features, as the user's sequence: true where a row starts
  // a new sequence at that step, in every layer and direction).
  m.def(
      "lstm(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor[] params, "
      "bool has_biases, bool has_proj, int num_layers, float dropout, bool train, "
      "bool bidirectional, *, Tensor? reset=None, float recurrent_dropout=0., "
      "float zoneout_cell=0., float zoneout_hidden=0., float weight_drop=0.) "
      "-> (Tensor, Tensor, Tensor)");
}

namespace fused_lstm {
extern const char kDoubleBackwardError[];  // autograd/kernel_ops.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_lstm native kernels; importing this module registers torch.ops.fused_lstm";
  // The error a second backward through the handwritten backwards raises, for the tests to match.
  m.attr("DOUBLE_BACKWARD_ERROR") = pybind11::str(fused_lstm::kDoubleBackwardError);
  // The CPU kernels' thresholds (tuning.h), for the tests that cross them.
  {
    using namespace fused_lstm::tuning;
    pybind11::dict tuning;
    for (const auto& [name, value] :
         {std::pair{"gemm_work", kGemmWork}, {"direct_gemm_work", kDirectGemmWork},
          {"gemm_rows", kGemmRows},
          {"parallel_work", kParallelWork}, {"pointwise_weight", kPointwiseWeight},
          {"row_split_min_rows", kRowSplitMinRows}, {"row_split_copies", kRowSplitCopies},
          {"default_l2_bytes", kDefaultL2Bytes}, {"sweep_bytes", kSweepBytes},
          {"panel_bytes", kPanelBytes}, {"pack_copy_elements", kPackCopyElements},
          {"small_projection", kSmallProjection}, {"small_grads", kSmallGrads},
          {"onednn_work", kOneDnnWork}, {"narrow_columns", kNarrowColumns}}) {
      tuning[name] = value;
    }
    m.attr("TUNING") = tuning;
  }
  // The CPU kernels' ISA (cpu/isa.h). fused_lstm's import asks for it, so that a bad
  // FUSED_LSTM_CPU_ISA is a ValueError there (std::invalid_argument) rather than at a kernel call.
  m.def("cpu_isa", [] { return fused_lstm::cpu_isa_name(fused_lstm::cpu_isa()); },
        "the ISA the CPU kernels run in: avx512, avx2 or baseline");
  m.def("cpu_isas", [] {
    pybind11::list names;
    for (const fused_lstm::CpuIsa isa : fused_lstm::cpu_isas()) {
      names.append(fused_lstm::cpu_isa_name(isa));
    }
    return names;
  }, "the ISAs this build's CPU kernels can run in on this CPU, widest first");
  // at::parallel_for is inline: it runs on one thread in a file compiled without OpenMP, which is
  // how the kernels' threaded steps once ran. This file is compiled with the kernels' flags.
  m.def("parallel_for_threads", [] {
    std::mutex mutex;
    std::set<int> seen;
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      const std::lock_guard<std::mutex> lock(mutex);
      seen.insert(at::get_thread_num());
    });
    return seen.size();
  }, "how many threads at::parallel_for runs a split of get_num_threads() pieces on in the kernels");
}

// Autograd of the kernel ops declared in fused_lstm/_library.py (layer_forward, layer_backward,
// cell_forward, cell_backward), in C++: a torch::autograd::Function per differentiable op,
// registered for the Autograd key, as torchvision does for roi_align. The backwards are the
// kernels' handwritten ones; they treat the saved workspace as constants, so a second backward
// through them raises. The whole-LSTM op lstm has its own file: lstm_op.cpp.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include "op_handles.h"

namespace fused_lstm {

extern const char kDoubleBackwardError[] =
    "fused_lstm: double backward is not supported (differentiating gradients that were computed "
    "with create_graph=True through FusedLSTM, FusedLSTMCell, fused_lstm::lstm, "
    "fused_lstm::layer_forward or fused_lstm::cell_forward)";

namespace autograd {
namespace {

// Each forward op's Autograd kernel: straight below autograd when nothing needs a gradient (no
// node, no saved workspace), else through its Function.

// ---- layer_forward -----------------------------------------------------------------------------

struct LayerForward : public torch::autograd::Function<LayerForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& batch_sizes, const Tensor& h0,
                               const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               const optional<Tensor>& w_hr, bool reverse,
                               const optional<Tensor>& recurrent_mask,
                               const optional<Tensor>& zoneout_cell,
                               const optional<Tensor>& zoneout_hidden,
                               const optional<Tensor>& reset) {
    const Below below;
    auto [y, h, c, gates, cells] =
        ops().layer_forward.call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                 recurrent_mask, zoneout_cell, zoneout_hidden, reset);
    // The workspace is saved state for the backward, not a differentiable result; an unused
    // output's gradient reaches the backward undefined rather than as zeros.
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = b_ih.has_value();
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, w_hr.value_or(Tensor()), y, gates, cells,
                            recurrent_mask.value_or(Tensor()), zoneout_cell.value_or(Tensor()),
                            zoneout_hidden.value_or(Tensor()), reset.value_or(Tensor())});
    return {y, h, c, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto saved = ctx->get_saved_variables();
    const auto& [input, h0, c0, w_ih, w_hh, w_hr, y, gates, cells] =
        std::tie(saved[0], saved[1], saved[2], saved[3], saved[4], saved[5], saved[6], saved[7],
                 saved[8]);
    const auto batch_sizes = ctx->saved_data["batch_sizes"].toOptional<Tensor>();
    variable_list g;
    {
      const Below below;
      auto [dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr] = ops().layer_backward.call(
          opt(grad[0]), opt(grad[1]), opt(grad[2]), input, batch_sizes, h0, c0, w_ih, w_hh,
          opt(w_hr), y, gates, cells, ctx->saved_data["reverse"].toBool(), opt(saved[9]),
          opt(saved[10]), opt(saved[11]), opt(saved[12]));
      g = {dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr};
    }
    g = refuse_double_backward(g, concat({{grad[0], grad[1], grad[2]}, saved}));
    const Tensor db = ctx->saved_data["has_bias"].toBool() ? g[5] : Tensor();
    // batch_sizes, reverse, the masks and the resets are constants.
    return {g[0], Tensor(), g[1], g[2], g[3], g[4], db, db, w_hr.defined() ? g[6] : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensors5 layer_forward_autograd(const Tensor& input, const optional<Tensor>& batch_sizes,
                                const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                const Tensor& w_hh, const optional<Tensor>& b_ih,
                                const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                                bool reverse, const optional<Tensor>& recurrent_mask,
                                const optional<Tensor>& zoneout_cell,
                                const optional<Tensor>& zoneout_hidden,
                                const optional<Tensor>& reset) {
  if (!torch::autograd::compute_requires_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)) {
    const Below below;
    return ops().layer_forward.call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   reverse, recurrent_mask, zoneout_cell, zoneout_hidden, reset);
  }
  auto out = LayerForward::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                 recurrent_mask, zoneout_cell, zoneout_hidden, reset);
  return {out[0], out[1], out[2], out[3], out[4]};
}

// ---- cell_forward ------------------------------------------------------------------------------

struct CellForward : public torch::autograd::Function<CellForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0,
                               const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
    const Below below;
    auto [h, c, gates, cells] = ops().cell_forward.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh);
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);
    ctx->saved_data["has_bias"] = b_ih.has_value();
    // In the order of cell_backward's arguments after the incoming gradients.
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, gates, cells});
    return {h, c, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto s = ctx->get_saved_variables();
    variable_list g;
    {
      const Below below;
      auto [dx, dh0, dc0, dw_ih, dw_hh, db] = ops().cell_backward.call(
          opt(grad[0]), opt(grad[1]), s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
      g = {dx, dh0, dc0, dw_ih, dw_hh, db};
    }
    g = refuse_double_backward(g, concat({{grad[0], grad[1]}, s}));
    const Tensor db = ctx->saved_data["has_bias"].toBool() ? g[5] : Tensor();
    return {g[0], g[1], g[2], g[3], g[4], db, db};
  }
};

Tensors4 cell_forward_autograd(const Tensor& input, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh,
                               const optional<Tensor>& b_ih, const optional<Tensor>& b_hh) {
  if (!torch::autograd::compute_requires_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh)) {
    const Below below;
    return ops().cell_forward.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh);
  }
  auto out = CellForward::apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2], out[3]};
}

// ---- the backward ops: not differentiable ------------------------------------------------------
//
// Their results carry no graph (the forward ops' backwards above attach the double-backward
// error to them instead). Without an Autograd kernel of their own, autograd's fallback would give
// them a graph whose backward only warns and returns zeros.

Tensors7 layer_backward_autograd(const optional<Tensor>& grad_output,
                                 const optional<Tensor>& grad_h_n,
                                 const optional<Tensor>& grad_c_n, const Tensor& input,
                                 const optional<Tensor>& batch_sizes, const Tensor& h0,
                                 const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                                 const optional<Tensor>& w_hr, const Tensor& output,
                                 const Tensor& gates, const Tensor& cells, bool reverse,
                                 const optional<Tensor>& recurrent_mask,
                                 const optional<Tensor>& zoneout_cell,
                                 const optional<Tensor>& zoneout_hidden,
                                 const optional<Tensor>& reset) {
  const Below below;
  return ops().layer_backward.call(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0,
                                  w_ih, w_hh, w_hr, output, gates, cells, reverse, recurrent_mask,
                                  zoneout_cell, zoneout_hidden, reset);
}

Tensors6 cell_backward_autograd(const optional<Tensor>& grad_h, const optional<Tensor>& grad_c,
                                const Tensor& input, const Tensor& h0, const Tensor& c0,
                                const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates,
                                const Tensor& cells) {
  const Below below;
  return ops().cell_backward.call(grad_h, grad_c, input, h0, c0, w_ih, w_hh, gates, cells);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("layer_forward", &layer_forward_autograd);
  m.impl("layer_backward", &layer_backward_autograd);
  m.impl("cell_forward", &cell_forward_autograd);
  m.impl("cell_backward", &cell_backward_autograd);
}

}  // namespace autograd
}  // namespace fused_lstm

// Autograd of the kernel ops declared in fused_lstm/op_schemas.inc (layer_forward, layer_backward,
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

// What layer_forward's backward reads, by name: the call (its biases aside, which the gradients do
// not read) and the forward's results. save_for_backward takes one flat list of tensors; pack
// lays the tensors out in it and unpack reads them back; batch_sizes, a CPU constant, and the
// flags go to saved_data.
struct LayerSaved {
  LayerArgs forward;
  Tensor output, gates, cells;

  void save(AutogradContext* ctx) const {
    const LayerArgs& a = forward;
    ctx->saved_data["batch_sizes"] = a.batch_sizes;
    ctx->saved_data["reverse"] = a.reverse;
    ctx->saved_data["has_bias"] = a.b_ih.has_value();
    variable_list out{a.input, a.h0,  a.c0, a.w_ih, a.w_hh, a.w_hr.value_or(Tensor()),
                      output,  gates, cells};
    save_regularisers(out, a.regs);
    ctx->save_for_backward(out);
  }

  static LayerSaved load(AutogradContext* ctx, const variable_list& saved) {
    auto it = saved.cbegin();
    LayerSaved s;
    LayerArgs& a = s.forward;
    a.input = *it++, a.h0 = *it++, a.c0 = *it++, a.w_ih = *it++, a.w_hh = *it++;
    a.w_hr = opt(*it++);
    s.output = *it++, s.gates = *it++, s.cells = *it++;
    a.regs = load_regularisers(it);
    a.batch_sizes = ctx->saved_data["batch_sizes"].toOptional<Tensor>();
    a.reverse = ctx->saved_data["reverse"].toBool();
    return s;
  }
};

struct LayerForward : public torch::autograd::Function<LayerForward> {
  // a is the call; the tensors after it are its differentiable ones, which autograd tracks (and
  // backward returns their gradients in this order).
  static variable_list forward(AutogradContext* ctx, const LayerArgs& a, const Tensor&,
                               const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                               const optional<Tensor>&, const optional<Tensor>&,
                               const optional<Tensor>&) {
    const Below below;
    auto [y, h, c, gates, cells] = call_layer_forward(ops().layer_forward, a);
    // The workspace is saved state for the backward, not a differentiable result; an unused
    // output's gradient reaches the backward undefined rather than as zeros.
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);
    LayerSaved{a, y, gates, cells}.save(ctx);
    return {y, h, c, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const variable_list saved_list = ctx->get_saved_variables();
    LayerSaved saved = LayerSaved::load(ctx, saved_list);
    variable_list g;
    {
      const Below below;
      auto [dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr] =
          call_layer_backward(ops().layer_backward, {.forward = saved.forward,
                                                     .grad_output = opt(grad[0]),
                                                     .grad_h_n = opt(grad[1]),
                                                     .grad_c_n = opt(grad[2]),
                                                     .output = saved.output,
                                                     .gates = saved.gates,
                                                     .cells = saved.cells});
      g = {dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr};
    }
    g = refuse_double_backward(g, concat({{grad[0], grad[1], grad[2]}, saved_list}));
    const Tensor db = ctx->saved_data["has_bias"].toBool() ? g[5] : Tensor();
    // The call itself (batch_sizes, reverse, the masks and the resets) is a constant.
    return {Tensor(), g[0], g[1], g[2], g[3], g[4], db, db, saved.forward.w_hr ? g[6] : Tensor()};
  }
};

struct LayerAutograd {
  static LayerForwardResult forward(const LayerArgs& a) {
    if (!torch::autograd::compute_requires_grad(a.input, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh,
                                                a.w_hr)) {
      const Below below;
      return call_layer_forward(ops().layer_forward, a);
    }
    auto out = LayerForward::apply(a, a.input, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr);
    return {out[0], out[1], out[2], out[3], out[4]};
  }

  // The backward op is not differentiable: its results carry no graph (the forward ops'
  // backwards attach the double-backward error to them instead). Without an Autograd kernel of
  // its own, autograd's fallback would give them a graph whose backward only warns and returns
  // zeros.
  static LayerBackwardResult backward(const LayerBackwardArgs& b) {
    const Below below;
    return call_layer_backward(ops().layer_backward, b);
  }
};

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

CellForwardResult cell_forward_autograd(const Tensor& input, const Tensor& h0, const Tensor& c0,
                                        const Tensor& w_ih, const Tensor& w_hh,
                                        const optional<Tensor>& b_ih,
                                        const optional<Tensor>& b_hh) {
  if (!torch::autograd::compute_requires_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh)) {
    const Below below;
    return ops().cell_forward.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh);
  }
  auto out = CellForward::apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh);
  return {out[0], out[1], out[2], out[3]};
}

// ---- cell_backward: not differentiable, as layer_backward above -------------------------------

CellBackwardResult cell_backward_autograd(const optional<Tensor>& grad_h,
                                          const optional<Tensor>& grad_c, const Tensor& input,
                                          const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                          const Tensor& w_hh, const Tensor& gates,
                                          const Tensor& cells) {
  const Below below;
  return ops().cell_backward.call(grad_h, grad_c, input, h0, c0, w_ih, w_hh, gates, cells);
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("layer_forward", &layer_forward_entry<LayerAutograd>);
  m.impl("layer_backward", &layer_backward_entry<LayerAutograd>);
  m.impl("cell_forward", &cell_forward_autograd);
  m.impl("cell_backward", &cell_backward_autograd);
}

}  // namespace autograd
}  // namespace fused_lstm

// The kernel ops' arguments as one parameter struct per op, filled and checked once, and the
// schema-shaped entry points that every backend registers (register_layer_ops). A backend
// provides only
//
//   struct Kernels {
//     static LayerForwardResult forward(const LayerParams& p);
//     static LayerBackwardResult backward(const LayerBackwardParams& p);
//   };
//
// and so never spells the ops' signatures. A new option of the layer ops touches the schema
// (fused_lstm/_library.py), the struct and its checks here, the kernels that use it and the
// reference (fused_lstm/reference.py), plus the autograd that passes it along (autograd/).
//
// Shapes (N rows: T*B padded, or sum(batch_sizes) packed; Hr = proj_size if w_hr is given,
// else H):
//   input  (T, B, I) or (N, I)     w_ih (4H, I)   w_hh (4H, Hr)   b_ih, b_hh (4H)   w_hr (Hr, H)
//   h0     (B, Hr)   c0 (B, H)     output (…, Hr) gates (…, 4H): i, f, g, o activations
//   cells  (…, H): c_t
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "lstm_common.h"

namespace fused_lstm {

using LayerForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// layer_forward's arguments (fused_lstm/_library.py) and what checking them derives: the dimensions
// and the order in which the recurrence visits the rows.
struct LayerParams {
  at::Tensor input;
  std::optional<at::Tensor> batch_sizes;
  at::Tensor h0, c0, w_ih, w_hh;
  std::optional<at::Tensor> b_ih, b_hh, w_hr;
  bool reverse = false;
  Regularisers regs;
  // Set by check().
  LayerDims d{};
  StepLayout steps;

  // Checks every argument against the others (naming it and what is required) and derives d
  // and steps.
  void check() {
    d = check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
    check_regularisers(regs, d, input);
    steps = make_steps(input, batch_sizes, d.B, reverse);
  }

  // The same call with its floating-point tensors in dtype (reset and batch_sizes stay).
  LayerParams to(at::ScalarType dtype) const {
    LayerParams p = *this;
    p.input = input.to(dtype);
    for (at::Tensor* t : {&p.h0, &p.c0, &p.w_ih, &p.w_hh}) *t = t->to(dtype);
    for (auto* t : {&p.b_ih, &p.b_hh, &p.w_hr, &p.regs.recurrent_mask, &p.regs.zoneout_cell,
                    &p.regs.zoneout_hidden}) {
      if (*t) *t = (*t)->to(dtype);
    }
    return p;
  }
};

// layer_backward's arguments: the forward's (without the biases, which its gradients do not
// read), the incoming gradients, each None where unused, and the forward's results.
struct LayerBackwardParams : LayerParams {
  std::optional<at::Tensor> grad_output, grad_h_n, grad_c_n;
  at::Tensor output, gates, cells;

  void check() {
    d = check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
    check_regularisers(regs, d, input);
    check_grads(grad_output, grad_h_n, grad_c_n, output, h0, c0);
    steps = make_steps(input, batch_sizes, d.B, reverse);
  }

  LayerBackwardParams to(at::ScalarType dtype) const {
    LayerBackwardParams p = *this;
    static_cast<LayerParams&>(p) = LayerParams::to(dtype);
    for (auto* t : {&p.grad_output, &p.grad_h_n, &p.grad_c_n}) {
      if (*t) *t = (*t)->to(dtype);
    }
    for (at::Tensor* t : {&p.output, &p.gates, &p.cells}) *t = t->to(dtype);
    return p;
  }
};

// ---- the entry points, in the schemas' argument order ------------------------------------------

template <class Kernels>
LayerForwardResult layer_forward_op(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& reset) {
  const BelowAutograd below_autograd;
  LayerParams p;
  p.input = input, p.batch_sizes = batch_sizes, p.h0 = h0, p.c0 = c0, p.w_ih = w_ih;
  p.w_hh = w_hh, p.b_ih = b_ih, p.b_hh = b_hh, p.w_hr = w_hr, p.reverse = reverse;
  p.regs = {recurrent_mask, zoneout_cell, zoneout_hidden, reset};
  p.check();
  return Kernels::forward(p);
}

template <class Kernels>
LayerBackwardResult layer_backward_op(
    const std::optional<at::Tensor>& grad_output, const std::optional<at::Tensor>& grad_h_n,
    const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
    const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& w_hr,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells, bool reverse,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& reset) {
  const BelowAutograd below_autograd;
  LayerBackwardParams p;
  p.grad_output = grad_output, p.grad_h_n = grad_h_n, p.grad_c_n = grad_c_n;
  p.input = input, p.batch_sizes = batch_sizes, p.h0 = h0, p.c0 = c0, p.w_ih = w_ih;
  p.w_hh = w_hh, p.w_hr = w_hr, p.output = output, p.gates = gates, p.cells = cells;
  p.reverse = reverse;
  p.regs = {recurrent_mask, zoneout_cell, zoneout_hidden, reset};
  p.check();
  return Kernels::backward(p);
}

// ---- cell_forward / cell_backward: one step, input (B, I), h0 and c0 (B, H), no projection ----
//
// Each backend runs them as its layer kernels on a sequence of one step: a step of the layer is
// already one fused pass (one launch on CUDA), and the layer's dtypes, checks and batch-size-0
// handling carry over.

// The cell's own ranks and batch, checked before the layer sees input as (1, B, I), so that a
// wrong one is reported in the cell's terms.
inline void check_cell_args(const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0) {
  TORCH_CHECK(input.dim() == 2, "fused_lstm: input must be (B, I), got ", input.dim(), "-D");
  for (const auto& [t, name] : {std::pair{&h0, "h0"}, {&c0, "c0"}}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == input.size(0), "fused_lstm: ", name,
                " must be (B, H) with B = input.size(0) = ", input.size(0), ", got ",
                t->sizes());
  }
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_forward_op(
    const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  const BelowAutograd below_autograd;
  check_cell_args(input, h0, c0);
  LayerParams p;
  p.input = input.unsqueeze(0), p.h0 = h0, p.c0 = c0, p.w_ih = w_ih, p.w_hh = w_hh;
  p.b_ih = b_ih, p.b_hh = b_hh;
  p.check();
  auto [output, h, c, gates, cells] = Kernels::forward(p);
  return {h, c, gates.squeeze(0), cells.squeeze(0)};
}

template <class Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
cell_backward_op(const std::optional<at::Tensor>& grad_h, const std::optional<at::Tensor>& grad_c,
                 const at::Tensor& input, const at::Tensor& h0, const at::Tensor& c0,
                 const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& gates,
                 const at::Tensor& cells) {
  const BelowAutograd below_autograd;
  check_cell_args(input, h0, c0);
  LayerBackwardParams p;
  p.input = input.unsqueeze(0), p.h0 = h0, p.c0 = c0, p.w_ih = w_ih, p.w_hh = w_hh;
  // layer_backward does not check the workspace it is given (layer_forward's own); the cell's
  // is checked here, against the layer's dimensions.
  p.d = check_layer_args(p.input, std::nullopt, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt,
                         std::nullopt);
  FL_CHECK_SHAPE(gates, p.d.B, 4 * p.d.H);
  FL_CHECK_SHAPE(cells, p.d.B, p.d.H);
  check_same(gates, "gates", input);
  check_same(cells, "cells", input);
  check_grad(grad_h, "grad_h", h0, input);
  check_grad(grad_c, "grad_c", c0, input);
  // With one step every h_{t-1} is h0, so the backward reads nothing of the output but its
  // shape, which h0 has: the cell need not save h.
  p.grad_h_n = grad_h, p.grad_c_n = grad_c;
  p.output = h0.unsqueeze(0), p.gates = gates.unsqueeze(0), p.cells = cells.unsqueeze(0);
  p.check();
  auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
      Kernels::backward(p);
  return {grad_input.squeeze(0), grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias};
}

// Registers a backend's kernels for the four kernel ops, under the dispatch key m was opened
// for (TORCH_LIBRARY_IMPL).
template <class Kernels>
void register_layer_ops(torch::Library& m) {
  m.impl("layer_forward", &layer_forward_op<Kernels>);
  m.impl("layer_backward", &layer_backward_op<Kernels>);
  m.impl("cell_forward", &cell_forward_op<Kernels>);
  m.impl("cell_backward", &cell_backward_op<Kernels>);
}

}  // namespace fused_lstm

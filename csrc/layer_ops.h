// The kernel ops' schema-shaped entry points, the one place that turns a call's arguments into a
// LayerArgs (layer_args.h) and a LayerArgs back into a dispatcher call, and the registration that
// every backend uses (register_layer_ops). A backend provides only
//
//   struct Kernels {
//     static LayerForwardResult forward(const LayerParams& p);
//     static LayerBackwardResult backward(const LayerBackwardParams& p);
//   };
//
// and so never spells the ops' signatures; the autograd (autograd/) registers its own Impl
// through the same entry points.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "layer_args.h"

namespace fused_lstm {

using LayerForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LayerBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CellForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using CellBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

using OptTensor = std::optional<at::Tensor>;

// Held for the whole of a kernel:
// - below autograd: the ATen calls inside it (GEMMs, allocations, views) then skip the autograd
//   and view-tracking layers of the dispatcher, which the kernel's results never need (the op's
//   own autograd registration handles them) and which at a few steps cost more than the
//   arithmetic;
// - without autocast: the kernels compute in their inputs' dtype (the modules cast for autocast,
//   as nn.LSTM does), and an enclosing autocast region would otherwise recast the products
//   inside (a float32 input projection to bfloat16 under CPU autocast, a float16 one to
//   bfloat16 under CUDA autocast), leaving buffers of another dtype than the loops read.
struct KernelGuard {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// ---- layer_forward / layer_backward, in the schemas' argument order ------------------------

#define FL_REG_PARAM(name) , const OptTensor& name
#define FL_REG_INIT(name) .name = name,
#define FL_REG_ARG(name) , a.regs.name

// Impl::forward(LayerArgs) and Impl::backward(LayerBackwardArgs) receive each call whole.
template <class Impl>
LayerForwardResult layer_forward_entry(const at::Tensor& input, const OptTensor& batch_sizes,
                                       const at::Tensor& h0, const at::Tensor& c0,
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,
                                       const OptTensor& b_ih, const OptTensor& b_hh,
                                       const OptTensor& w_hr,
                                       bool reverse FL_REGULARISERS(FL_REG_PARAM)) {
  return Impl::forward(LayerArgs{.input = input,
                                 .batch_sizes = batch_sizes,
                                 .h0 = h0,
                                 .c0 = c0,
                                 .w_ih = w_ih,
                                 .w_hh = w_hh,
                                 .b_ih = b_ih,
                                 .b_hh = b_hh,
                                 .w_hr = w_hr,
                                 .reverse = reverse,
                                 .regs = {FL_REGULARISERS(FL_REG_INIT)}});
}

template <class Impl>
LayerBackwardResult layer_backward_entry(const OptTensor& grad_output, const OptTensor& grad_h_n,
                                         const OptTensor& grad_c_n, const at::Tensor& input,
                                         const OptTensor& batch_sizes, const at::Tensor& h0,
                                         const at::Tensor& c0, const at::Tensor& w_ih,
                                         const at::Tensor& w_hh, const OptTensor& w_hr,
                                         const at::Tensor& output, const at::Tensor& gates,
                                         const at::Tensor& cells,
                                         bool reverse FL_REGULARISERS(FL_REG_PARAM)) {
  return Impl::backward(LayerBackwardArgs{.forward = {.input = input,
                                                      .batch_sizes = batch_sizes,
                                                      .h0 = h0,
                                                      .c0 = c0,
                                                      .w_ih = w_ih,
                                                      .w_hh = w_hh,
                                                      .w_hr = w_hr,
                                                      .reverse = reverse,
                                                      .regs = {FL_REGULARISERS(FL_REG_INIT)}},
                                          .grad_output = grad_output,
                                          .grad_h_n = grad_h_n,
                                          .grad_c_n = grad_c_n,
                                          .output = output,
                                          .gates = gates,
                                          .cells = cells});
}

// The ops' C++ signatures, as the entry points spell them: what the dispatcher's typed handles
// take (autograd/op_handles.h).
struct AnyImpl;
using LayerForwardSig = std::remove_pointer_t<decltype(&layer_forward_entry<AnyImpl>)>;
using LayerBackwardSig = std::remove_pointer_t<decltype(&layer_backward_entry<AnyImpl>)>;

// A LayerArgs (LayerBackwardArgs) as a call of the op behind the typed handle `op`.
inline LayerForwardResult call_layer_forward(const c10::TypedOperatorHandle<LayerForwardSig>& op,
                                             const LayerArgs& a) {
  return op.call(a.input, a.batch_sizes, a.h0, a.c0, a.w_ih, a.w_hh, a.b_ih, a.b_hh, a.w_hr,
                 a.reverse FL_REGULARISERS(FL_REG_ARG));
}

inline LayerBackwardResult call_layer_backward(const c10::TypedOperatorHandle<LayerBackwardSig>& op,
                                               const LayerBackwardArgs& b) {
  const LayerArgs& a = b.forward;
  return op.call(b.grad_output, b.grad_h_n, b.grad_c_n, a.input, a.batch_sizes, a.h0, a.c0, a.w_ih,
                 a.w_hh, a.w_hr, b.output, b.gates, b.cells, a.reverse FL_REGULARISERS(FL_REG_ARG));
}

#undef FL_REG_PARAM
#undef FL_REG_INIT
#undef FL_REG_ARG

// A backend's kernels behind the entry points: under KernelGuard, on checked arguments.
template <class Kernels>
struct Checked {
  static LayerForwardResult forward(LayerArgs a) {
    const KernelGuard guard;
    return Kernels::forward(LayerParams(std::move(a)));
  }
  static LayerBackwardResult backward(LayerBackwardArgs a) {
    const KernelGuard guard;
    return Kernels::backward(LayerBackwardParams(std::move(a)));
  }
};

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
                " must be (B, H) with B = input.size(0) = ", input.size(0), ", got ", t->sizes());
  }
}

template <class Kernels>
CellForwardResult cell_forward_op(const at::Tensor& input, const at::Tensor& h0,
                                  const at::Tensor& c0, const at::Tensor& w_ih,
                                  const at::Tensor& w_hh, const OptTensor& b_ih,
                                  const OptTensor& b_hh) {
  const KernelGuard guard;
  check_cell_args(input, h0, c0);
  auto [output, h, c, gates, cells] =
      Kernels::forward(LayerParams(LayerArgs{.input = input.unsqueeze(0),
                                             .h0 = h0,
                                             .c0 = c0,
                                             .w_ih = w_ih,
                                             .w_hh = w_hh,
                                             .b_ih = b_ih,
                                             .b_hh = b_hh}));
  return {h, c, gates.squeeze(0), cells.squeeze(0)};
}

template <class Kernels>
CellBackwardResult cell_backward_op(const OptTensor& grad_h, const OptTensor& grad_c,
                                    const at::Tensor& input, const at::Tensor& h0,
                                    const at::Tensor& c0, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const at::Tensor& gates,
                                    const at::Tensor& cells) {
  const KernelGuard guard;
  check_cell_args(input, h0, c0);
  // With one step every h_{t-1} is h0, so the backward reads nothing of the output but its
  // shape, which h0 has: the cell need not save h.
  const LayerBackwardParams p(
      LayerBackwardArgs{
          .forward = {.input = input.unsqueeze(0), .h0 = h0, .c0 = c0, .w_ih = w_ih, .w_hh = w_hh},
          .grad_h_n = grad_h,
          .grad_c_n = grad_c,
          .output = h0.unsqueeze(0),
          .gates = gates.unsqueeze(0),
          .cells = cells.unsqueeze(0)},
      "grad_h", "grad_c");
  // The layer does not check the workspace it is given (layer_forward's own); the cell's is
  // checked here, in the cell's shapes.
  FL_CHECK_SHAPE(gates, p.d.B, 4 * p.d.H);
  FL_CHECK_SHAPE(cells, p.d.B, p.d.H);
  check_same(gates, "gates", input);
  check_same(cells, "cells", input);
  auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
      Kernels::backward(p);
  return {grad_input.squeeze(0), grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias};
}

// Registers a backend's kernels for the four kernel ops, under the dispatch key m was opened
// for (TORCH_LIBRARY_IMPL).
template <class Kernels>
void register_layer_ops(torch::Library& m) {
  m.impl("layer_forward", &layer_forward_entry<Checked<Kernels>>);
  m.impl("layer_backward", &layer_backward_entry<Checked<Kernels>>);
  m.impl("cell_forward", &cell_forward_op<Kernels>);
  m.impl("cell_backward", &cell_backward_op<Kernels>);
}

}  // namespace fused_lstm

// CPU implementation of fused_lstm::layer_forward / layer_backward.
//
// The input projection, and in the backward the weight and input gradients, are a few large
// ATen GEMMs over the whole sequence. What remains per step is the recurrent product and the
// gate math. For the small LSTMs our users train on long sequences a step costs tens of
// nanoseconds of arithmetic, so the per-step loop runs on raw pointers: no dispatcher call,
// allocation or tensor view. Only when a step's product is big enough for BLAS to pay back the
// call does the loop hand it to ATen (kGemmWork, kGemmRows), and only when a step's work pays
// for waking a second thread does it split the work across threads (kParallelWork). The
// thresholds are ../tuning.h's.
//
// This file holds the entry points and their registration; the rest, one concern a header, is
// included here only, so that the loops inline across them as in one file:
//   microkernels.h    register tiles of a step's product, per ISA
//   step_product.h    W packed once per call, the thread split, the hand-over to BLAS
//   step_regs.h       the regularisers and resets as the loops read them
//   pointwise.h       the gate math of a step, forward and backward
//   recurrence.h      the forward and backward loops over the steps
//   small_products.h  the input projection and the small-size closing gradient loops
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../lstm_common.h"
#include "recurrence.h"
#include "small_products.h"
#include "step_regs.h"

namespace fused_lstm {
namespace {

using namespace tuning;

// The loops run in float or double; half and bfloat16 storage computes in float.
bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}
std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& reset) {
  const BelowAutograd below_autograd;
  const LayerDims d = check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  const Regularisers regs{recurrent_mask, zoneout_cell, zoneout_hidden, reset};
  check_regularisers(regs, d, input);
  if (is_reduced(input)) {
    auto r = layer_forward_cpu(input.to(at::kFloat), batch_sizes, h0.to(at::kFloat),
                               c0.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat),
                               to_float(b_ih), to_float(b_hh), to_float(w_hr), reverse,
                               to_float(recurrent_mask), to_float(zoneout_cell),
                               to_float(zoneout_hidden), reset);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
            std::get<3>(r).to(dt), std::get<4>(r).to(dt)};
  }
  const StepLayout L = make_steps(input, batch_sizes, d.B, reverse);
  const at::Tensor x = input.reshape({-1, d.I});
  const bool small = L.rows * 4 * d.H * d.I < kSmallProjection;
  at::Tensor gates = small ? at::empty({L.rows, 4 * d.H}, x.options())
                           : input_projection(x, w_ih, b_ih, b_hh);
  at::Tensor cells = at::empty({L.rows, d.H}, x.options());
  at::Tensor output = at::empty({L.rows, d.Hr}, x.options());
  at::Tensor h = h0.contiguous().clone();
  at::Tensor c = c0.contiguous().clone();
  const at::Tensor whh = w_hh.contiguous();
  const std::optional<at::Tensor> whr = w_hr ? std::optional(w_hr->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_lstm_layer_forward_cpu", [&] {
    if (small) {
      const at::Tensor xc = x.contiguous(), wih = w_ih.contiguous();
      const at::Tensor bih = b_ih ? b_ih->contiguous() : at::Tensor();
      const at::Tensor bhh = b_hh ? b_hh->contiguous() : at::Tensor();
      small_input_projection<scalar_t>(
          xc.const_data_ptr<scalar_t>(), L.rows, d.I, wih.const_data_ptr<scalar_t>(), 4 * d.H,
          b_ih ? bih.const_data_ptr<scalar_t>() : nullptr,
          b_hh ? bhh.const_data_ptr<scalar_t>() : nullptr, gates.data_ptr<scalar_t>());
    }
    if (regs.any()) {
      const StepRegs<scalar_t> step_regs(regs, d, x.options());
      forward_loop<scalar_t, true>(L, d, gates, cells, output, h, c, whh, whr, &step_regs);
    } else {
      forward_loop<scalar_t, false>(L, d, gates, cells, output, h, c, whh, whr, nullptr);
    }
  });
  return {shaped_like_input(input, output), h, c, shaped_like_input(input, gates),
          shaped_like_input(input, cells)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_cpu(const std::optional<at::Tensor>& grad_output,
                   const std::optional<at::Tensor>& grad_h_n,
                   const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                   const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, const at::Tensor& output,
                   const at::Tensor& gates, const at::Tensor& cells, bool reverse,
                   const std::optional<at::Tensor>& recurrent_mask,
                   const std::optional<at::Tensor>& zoneout_cell,
                   const std::optional<at::Tensor>& zoneout_hidden,
                   const std::optional<at::Tensor>& reset) {
  const BelowAutograd below_autograd;
  const LayerDims d =
      check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  const Regularisers regs{recurrent_mask, zoneout_cell, zoneout_hidden, reset};
  check_regularisers(regs, d, input);
  check_grads(grad_output, grad_h_n, grad_c_n, output, h0, c0);
  if (is_reduced(input)) {
    auto r = layer_backward_cpu(to_float(grad_output), to_float(grad_h_n), to_float(grad_c_n),
                                input.to(at::kFloat), batch_sizes, h0.to(at::kFloat),
                                c0.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat),
                                to_float(w_hr), output.to(at::kFloat), gates.to(at::kFloat),
                                cells.to(at::kFloat), reverse, to_float(recurrent_mask),
                                to_float(zoneout_cell), to_float(zoneout_hidden), reset);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
            std::get<3>(r).to(dt), std::get<4>(r).to(dt), std::get<5>(r).to(dt),
            std::get<6>(r).to(dt)};
  }
  const StepLayout L = make_steps(input, batch_sizes, d.B, reverse);
  const auto opts = input.options();
  const FlatSequence seq = flatten_sequence(d, input, gates, cells, output, grad_output);
  const at::Tensor &acts = seq.acts, &cs = seq.cells, &y = seq.y, &dy = seq.dy;
  at::Tensor dh = grad_h_n ? grad_h_n->contiguous().clone() : at::zeros({d.B, d.Hr}, opts);
  at::Tensor dc = grad_c_n ? grad_c_n->contiguous().clone() : at::zeros({d.B, d.H}, opts);
  at::Tensor dz = at::empty({L.rows, 4 * d.H}, opts);
  at::Tensor h_prev = at::empty({L.rows, d.Hr}, opts);
  at::Tensor dh_all = d.proj ? at::empty({L.rows, d.Hr}, opts) : at::Tensor();
  at::Tensor m_all = d.proj ? at::empty({L.rows, d.H}, opts) : at::Tensor();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  const bool small = !d.proj && L.rows * 4 * d.H * (2 * d.I + d.Hr) < kSmallGrads;
  at::Tensor grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr;
  if (small) {
    grad_input = at::empty(input.sizes(), opts);
    grad_w_ih = at::empty({4 * d.H, d.I}, opts);
    grad_w_hh = at::empty({4 * d.H, d.Hr}, opts);
    grad_bias = at::empty({4 * d.H}, opts);
    grad_w_hr = at::empty({0}, opts);
  }
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_lstm_layer_backward_cpu", [&] {
    const scalar_t* pdy = dy.defined() ? dy.const_data_ptr<scalar_t>() : nullptr;
    gather_h_prev<scalar_t>(L, d.Hr, y.const_data_ptr<scalar_t>(), h0c.const_data_ptr<scalar_t>(),
                            h_prev.data_ptr<scalar_t>());
    if (regs.any()) {
      const StepRegs<scalar_t> step_regs(regs, d, opts);
      backward_loop<scalar_t, true>(L, d, pdy, acts, cs, c0c, whh, w_hr, dz, dh, dc, dh_all,
                                    m_all, &step_regs);
      regularise_h_prev<scalar_t>(L, d.Hr, step_regs, h_prev.data_ptr<scalar_t>());
    } else {
      backward_loop<scalar_t, false>(L, d, pdy, acts, cs, c0c, whh, w_hr, dz, dh, dc, dh_all,
                                     m_all, nullptr);
    }
    if (!small) return;
    const at::Tensor x = seq.x.contiguous(), wih = w_ih.contiguous();
    for (at::Tensor* t : {&grad_input, &grad_w_ih, &grad_w_hh, &grad_bias}) {
      std::fill_n(t->data_ptr<scalar_t>(), t->numel(), scalar_t(0));
    }
    small_sequence_grads<scalar_t>(
        dz.const_data_ptr<scalar_t>(), L.rows, 4 * d.H, x.const_data_ptr<scalar_t>(), d.I,
        h_prev.const_data_ptr<scalar_t>(), d.Hr, wih.const_data_ptr<scalar_t>(),
        grad_input.data_ptr<scalar_t>(), grad_w_ih.data_ptr<scalar_t>(),
        grad_w_hh.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>());
  });
  if (!small) {
    std::tie(grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr) =
        sequence_grads(d, input, seq, w_ih, dz, h_prev, dh_all, m_all);
  }
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("layer_forward", &layer_forward_cpu);
  m.impl("layer_backward", &layer_backward_cpu);
  m.impl("cell_forward", &cell_forward<&layer_forward_cpu>);
  m.impl("cell_backward", &cell_backward<&layer_backward_cpu>);
}

}  // namespace fused_lstm

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
// included here only, so that the compiler sees the loops whole and inlines across them:
//   microkernels.h    register tiles of a step's product, per ISA
//   step_product.h    W packed once per call, the thread split, the hand-over to BLAS
//   step_regs.h       the regularisers and resets as the loops read them
//   gemm_routing.h    which library computes a product over the whole sequence
//   pointwise.h       the gate math of a step, forward and backward
//   recurrence.h      the forward and backward loops over the steps
//   small_products.h  the input projection and the small-size closing gradient loops
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "../layer_buffers.h"
#include "../layer_ops.h"
#include "gemm_routing.h"
#include "pack_cache.h"
#include "recurrence.h"
#include "small_products.h"
#include "step_regs.h"

namespace fused_lstm {
namespace {

using namespace tuning;

// pack_cache::Kind's layout of a float copy (StepProduct's packs are 1 and 2).
constexpr int64_t kFloatCopyLayout = 3;

// The loops run in float or double; half and bfloat16 storage computes in float.
bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// Each of a result tuple's tensors in dtype.
template <typename... Ts>
std::tuple<Ts...> results_to(std::tuple<Ts...> r, at::ScalarType dtype) {
  std::apply([&](auto&... t) { ((t = t.to(dtype)), ...); }, r);
  return r;
}

// A half or bfloat16 weight in float, through the cache of packs: kept across calls while the
// weight is unchanged (pack_cache.h), rather than converted at every call.
at::Tensor cached_float(const at::Tensor& w, at::ScalarType dtype) {
  const pack_cache::Kind kind{.layout = kFloatCopyLayout, .dtype = dtype};
  const int64_t bytes = w.numel() * static_cast<int64_t>(c10::elementSize(dtype));
  return pack_cache::get(w, kind, bytes, [&] { return w.to(dtype); });
}

// The weights the packs are keyed on: the call's own (s, before any conversion to float).
PackSources sources_of(const LayerParams& s) { return {&s.w_hh, s.w_hr ? &*s.w_hr : nullptr}; }

LayerForwardResult layer_forward(const LayerParams& p, const PackSources& sources);

LayerForwardResult layer_forward(const LayerParams& p) {
  if (is_reduced(p.input)) {
    return results_to(layer_forward(p.to(at::kFloat, cached_float), sources_of(p)),
                      p.input.scalar_type());
  }
  return layer_forward(p, sources_of(p));
}

LayerForwardResult layer_forward(const LayerParams& p, const PackSources& sources) {
  const at::Tensor &input = p.input, &w_ih = p.w_ih;
  const std::optional<at::Tensor>&b_ih = p.b_ih, &b_hh = p.b_hh;
  const LayerDims& d = p.d;
  const Regularisers& regs = p.regs;
  const StepLayout& L = p.steps;
  const at::Tensor x = input.reshape({-1, d.I});
  const bool small = L.rows * 4 * d.H * d.I < kSmallProjection;
  at::Tensor gates =
      small ? at::empty({L.rows, 4 * d.H}, x.options()) : input_projection(x, w_ih, b_ih, b_hh);
  at::Tensor cells = at::empty({L.rows, d.H}, x.options());
  at::Tensor output = at::empty({L.rows, d.Hr}, x.options());
  at::Tensor h = p.h0.contiguous().clone();
  at::Tensor c = p.c0.contiguous().clone();
  const at::Tensor whh = p.w_hh.contiguous();
  const std::optional<at::Tensor> whr = p.w_hr ? std::optional(p.w_hr->contiguous()) : std::nullopt;
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
      forward_loop<scalar_t, true>(L, d, gates, cells, output, h, c, whh, whr, &step_regs, sources);
    } else {
      forward_loop<scalar_t, false>(L, d, gates, cells, output, h, c, whh, whr, nullptr, sources);
    }
  });
  return {shaped_like_input(input, output), h, c, shaped_like_input(input, gates),
          shaped_like_input(input, cells)};
}

LayerBackwardResult layer_backward(const LayerBackwardParams& p, const PackSources& sources);

LayerBackwardResult layer_backward(const LayerBackwardParams& p) {
  if (is_reduced(p.input)) {
    return results_to(layer_backward(p.to(at::kFloat, cached_float), sources_of(p)),
                      p.input.scalar_type());
  }
  return layer_backward(p, sources_of(p));
}

LayerBackwardResult layer_backward(const LayerBackwardParams& p, const PackSources& sources) {
  const at::Tensor &input = p.input, &w_ih = p.w_ih, &w_hh = p.w_hh;
  const std::optional<at::Tensor>& w_hr = p.w_hr;
  const std::optional<at::Tensor>&grad_h_n = p.grad_h_n, &grad_c_n = p.grad_c_n;
  const LayerDims& d = p.d;
  const Regularisers& regs = p.regs;
  const StepLayout& L = p.steps;
  const auto opts = input.options();
  const FlatSequence seq = flatten_sequence(p);
  const at::Tensor &acts = seq.acts, &cs = seq.cells, &y = seq.y, &dy = seq.dy;
  at::Tensor dh = grad_h_n ? grad_h_n->contiguous().clone() : at::zeros({d.B, d.Hr}, opts);
  at::Tensor dc = grad_c_n ? grad_c_n->contiguous().clone() : at::zeros({d.B, d.H}, opts);
  at::Tensor dz = at::empty({L.rows, 4 * d.H}, opts);
  at::Tensor h_prev = at::empty({L.rows, d.Hr}, opts);
  at::Tensor dh_all = d.proj ? at::empty({L.rows, d.Hr}, opts) : at::Tensor();
  at::Tensor m_all = d.proj ? at::empty({L.rows, d.H}, opts) : at::Tensor();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor h0c = p.h0.contiguous(), c0c = p.c0.contiguous();
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
      backward_loop<scalar_t, true>(L, d, pdy, acts, cs, c0c, whh, w_hr, dz, dh, dc, dh_all, m_all,
                                    &step_regs, sources);
      regularise_h_prev<scalar_t>(L, d.Hr, step_regs, h_prev.data_ptr<scalar_t>());
    } else {
      backward_loop<scalar_t, false>(L, d, pdy, acts, cs, c0c, whh, w_hr, dz, dh, dc, dh_all, m_all,
                                     nullptr, sources);
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
        sequence_grads<CpuProducts>(p, seq, dz, h_prev, dh_all, m_all);
  }
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

struct CpuKernels {
  static LayerForwardResult forward(const LayerParams& p) { return layer_forward(p); }
  static LayerBackwardResult backward(const LayerBackwardParams& p) { return layer_backward(p); }
};

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) { register_layer_ops<CpuKernels>(m); }

}  // namespace fused_lstm

// Host-side pieces shared by the CPU and CUDA implementations of the ops declared in
// fused_lstm/_library.py: argument checks (naming the argument and what is required), the step
// layout, and the ATen work around the per-step loops that is the same on every device. The
// buffers' shapes, and the parameter structs these checks fill: layer_ops.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include "tuning.h"

namespace fused_lstm {

#define FL_CHECK_SHAPE(x, ...)                                                        \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), "fused_lstm: " #x        \
              " must have shape ", at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

struct LayerDims {
  int64_t I, H, Hr, B;
  bool proj;
};

// Rows of every step in the order the recurrence visits them (reversed for the backward
// direction). Step s owns rows [start[s], start[s] + size[s]), the first size[s] batch rows.
struct StepLayout {
  std::vector<int64_t> start, size;
  int64_t rows = 0;
};

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fused_lstm: ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fused_lstm: ", name,
              " must be on the device of input (", input.device(), "), got ", t.device());
}

inline LayerDims check_layer_args(const at::Tensor& input,
                                  const std::optional<at::Tensor>& batch_sizes,
                                  const at::Tensor& h0, const at::Tensor& c0,
                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                  const std::optional<at::Tensor>& b_ih,
                                  const std::optional<at::Tensor>& b_hh,
                                  const std::optional<at::Tensor>& w_hr) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fused_lstm: input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(input.dim() == (batch_sizes ? 2 : 3), "fused_lstm: input must be ",
              batch_sizes ? "(N, I) packed data with batch_sizes" : "(T, B, I) without batch_sizes",
              ", got ", input.dim(), "-D");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 && w_hh.size(0) > 0,
              "fused_lstm: w_hh must be (4*hidden_size, Hr), got ", w_hh.sizes());
  LayerDims d;
  d.I = input.size(-1);
  d.H = w_hh.size(0) / 4;
  d.Hr = w_hh.size(1);
  d.proj = w_hr.has_value();
  d.B = h0.dim() == 2 ? h0.size(0) : -1;
  FL_CHECK_SHAPE(w_ih, 4 * d.H, d.I);
  FL_CHECK_SHAPE(h0, d.B, d.Hr);
  FL_CHECK_SHAPE(c0, d.B, d.H);
  for (const auto& [t, name] : {std::pair{&w_ih, "w_ih"}, {&w_hh, "w_hh"}, {&h0, "h0"},
                                {&c0, "c0"}}) {
    check_same(*t, name, input);
  }
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(),
              "fused_lstm: b_ih and b_hh must be given together or not at all");
  if (b_ih) {
    FL_CHECK_SHAPE(*b_ih, 4 * d.H);
    FL_CHECK_SHAPE(*b_hh, 4 * d.H);
    check_same(*b_ih, "b_ih", input);
    check_same(*b_hh, "b_hh", input);
  }
  if (d.proj) {
    FL_CHECK_SHAPE(*w_hr, d.Hr, d.H);
    check_same(*w_hr, "w_hr", input);
  } else {
    TORCH_CHECK(d.Hr == d.H, "fused_lstm: without w_hr, w_hh must be (4H, H), got ", w_hh.sizes());
  }
  if (batch_sizes) {
    const auto& bs = *batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "fused_lstm: batch_sizes must be a 1-D int64 CPU tensor, got ", bs.dim(),
                "-D ", bs.scalar_type(), " on ", bs.device());
  } else {
    TORCH_CHECK(input.size(1) == d.B, "fused_lstm: h0 must have input.size(1) = ", input.size(1),
                " rows, got ", d.B);
  }
  return d;
}

inline StepLayout make_steps(const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                             int64_t B, bool reverse) {
  StepLayout L;
  if (batch_sizes) {
    const auto bs = batch_sizes->contiguous();
    const int64_t* p = bs.data_ptr<int64_t>();
    const int64_t T = bs.numel();
    for (int64_t t = 0; t < T; ++t) {
      TORCH_CHECK(p[t] > 0 && p[t] <= B && (t == 0 || p[t] <= p[t - 1]) && (t > 0 || p[0] == B),
                  "fused_lstm: batch_sizes must be positive, non-increasing and start at h0.size(0) = ",
                  B, "; got ", p[t], " at step ", t);
      L.start.push_back(L.rows);
      L.size.push_back(p[t]);
      L.rows += p[t];
    }
    TORCH_CHECK(L.rows == input.size(0), "fused_lstm: input has ", input.size(0),
                " rows but batch_sizes sum to ", L.rows);
  } else {
    const int64_t T = input.size(0);
    for (int64_t t = 0; t < T; ++t) {
      L.start.push_back(t * B);
      L.size.push_back(B);
    }
    L.rows = T * B;
  }
  if (reverse) {
    std::reverse(L.start.begin(), L.start.end());
    std::reverse(L.size.begin(), L.size.end());
  }
  return L;
}

// layer_forward / layer_backward's regularisers and resets (meanings: fused_lstm/_library.py);
// each may be absent. Checked against the layer: dtype and device of input, and their shapes.
struct Regularisers {
  std::optional<at::Tensor> recurrent_mask, zoneout_cell, zoneout_hidden, reset;
  bool any() const { return recurrent_mask || zoneout_cell || zoneout_hidden || reset; }
};

// input's leading shape (T, B) or (N) with `width` appended.
inline std::vector<int64_t> lead_with(const at::Tensor& input, int64_t width) {
  auto sizes = input.sizes().vec();
  sizes.back() = width;
  return sizes;
}

inline void check_zoneout(const std::optional<at::Tensor>& z, const char* name,
                          const at::Tensor& input, int64_t width) {
  if (!z) return;
  const auto want = lead_with(input, width);
  TORCH_CHECK(z->dim() == 0 || z->sizes() == at::IntArrayRef(want), "fused_lstm: ", name,
              " must be a 0-dim rate or a mask of shape ", at::IntArrayRef(want), ", got ",
              z->sizes());
  check_same(*z, name, input);
}

inline void check_regularisers(const Regularisers& r, const LayerDims& d,
                               const at::Tensor& input) {
  if (r.recurrent_mask) {
    FL_CHECK_SHAPE(*r.recurrent_mask, d.B, d.Hr);
    check_same(*r.recurrent_mask, "recurrent_mask", input);
  }
  check_zoneout(r.zoneout_cell, "zoneout_cell", input, d.H);
  check_zoneout(r.zoneout_hidden, "zoneout_hidden", input, d.Hr);
  if (r.reset) {
    const auto want = input.sizes().slice(0, input.dim() - 1);
    TORCH_CHECK(r.reset->scalar_type() == at::kBool && r.reset->sizes() == want,
                "fused_lstm: reset must be a bool tensor of shape ", want, ", got ",
                r.reset->scalar_type(), " ", r.reset->sizes());
    TORCH_CHECK(r.reset->device() == input.device(), "fused_lstm: reset must be on the device "
                "of input (", input.device(), "), got ", r.reset->device());
  }
}

// Where each row's h_{t-1} comes from, for rebuilding H_prev with one gather instead of saving
// it: src[r] >= 0 is a row of the layer's output (the previously visited step, where that batch
// row was active), src[r] < 0 is row -1 - src[r] of h0 (the row's first visited step).
inline std::vector<int64_t> h_prev_sources(const StepLayout& L) {
  std::vector<int64_t> src(static_cast<size_t>(L.rows));
  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t prev_size = s > 0 ? L.size[s - 1] : 0, prev_start = s > 0 ? L.start[s - 1] : 0;
    for (int64_t b = 0; b < L.size[s]; ++b) {
      src[L.start[s] + b] = b < prev_size ? prev_start + b : -1 - b;
    }
  }
  return src;
}

// Held for the whole of a kernel: the ATen calls inside it (GEMMs, allocations, views) then
// skip the autograd and view-tracking layers of the dispatcher, which the kernel's results never
// need (the op's own autograd registration handles them) and which at a few steps cost more than
// the arithmetic.
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// An incoming gradient, which may be undefined (None): the shape of `like`, the dtype and device
// of `input`.
inline void check_grad(const std::optional<at::Tensor>& g, const char* name,
                       const at::Tensor& like, const at::Tensor& input) {
  if (!g) return;
  TORCH_CHECK(g->sizes() == like.sizes(), "fused_lstm: ", name, " must have shape ", like.sizes(),
              ", got ", g->sizes());
  check_same(*g, name, input);
}

// Checks the incoming gradients of layer_backward.
inline void check_grads(const std::optional<at::Tensor>& grad_output,
                        const std::optional<at::Tensor>& grad_h_n,
                        const std::optional<at::Tensor>& grad_c_n, const at::Tensor& output,
                        const at::Tensor& h0, const at::Tensor& c0) {
  check_grad(grad_output, "grad_output", output, output);
  check_grad(grad_h_n, "grad_h_n", h0, output);
  check_grad(grad_c_n, "grad_c_n", c0, output);
}

// A (rows, width) buffer viewed in input's leading shape: (T, B, width) padded, (N, width) packed.
inline at::Tensor shaped_like_input(const at::Tensor& input, const at::Tensor& t) {
  return t.view(lead_with(input, t.size(1)));
}

// layer_backward's sequence tensors as contiguous (rows, width) matrices; dy is undefined when
// grad_output is None.
struct FlatSequence {
  at::Tensor x, acts, cells, y, dy;
};

inline FlatSequence flatten_sequence(const LayerDims& d, const at::Tensor& input,
                                     const at::Tensor& gates, const at::Tensor& cells,
                                     const at::Tensor& output,
                                     const std::optional<at::Tensor>& grad_output) {
  return {input.reshape({-1, d.I}), gates.reshape({-1, 4 * d.H}).contiguous(),
          cells.reshape({-1, d.H}).contiguous(), output.reshape({-1, d.Hr}).contiguous(),
          grad_output ? grad_output->reshape({-1, d.Hr}).contiguous() : at::Tensor()};
}

// oneDNN's matmul on dense tensors, as the dispatcher op mkldnn::_linear_pointwise (Inductor's
// CPU linear), looked up once: a torch built without oneDNN lacks it and ATen's GEMM serves.
inline const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

// Whether x (M, K) times a (K, N) operand goes to onednn_linear.
inline bool use_onednn(const at::Tensor& x, int64_t N) {
  return x.is_cpu() && x.scalar_type() == at::kFloat &&
         x.size(0) * x.size(1) * N >= tuning::kOneDnnWork && onednn_linear();
}

// x w^T (+ bias) through onednn_linear; x (M, K), w (N, K), any strides.
inline at::Tensor onednn_mm(const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& bias) {
  torch::jit::Stack stack{x, w, bias, c10::string_view("none"),
                          c10::List<std::optional<at::Scalar>>(), c10::string_view("")};
  onednn_linear()->callBoxed(stack);
  return stack.back().toTensor();
}

// a @ b with ATen's GEMM. On the CPU a narrow product (tuning::kNarrowColumns) is computed
// transposed; cuBLAS takes either orientation at the same speed.
inline at::Tensor mm_narrow(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_cpu() || b.size(1) >= tuning::kNarrowColumns) return at::mm(a, b);
  return at::mm(b.t(), a.t()).t().contiguous();
}

// The input gradient dz @ W_ih: large float32 CPU products go to oneDNN (use_onednn), which
// copies W_ih^T first (a weight, once per call).
inline at::Tensor grad_input_product(const at::Tensor& dz, const at::Tensor& w_ih) {
  if (use_onednn(dz, w_ih.size(1))) return onednn_mm(dz, w_ih.t(), std::nullopt);
  return mm_narrow(dz, w_ih);
}

// A weight gradient d^T v, summed over the sequence's rows: always ATen's GEMM, which reads the
// transposed d where it is. oneDNN's linear would first copy d^T and v^T, two sequence-sized
// tensors, and was the slower for it (benchmarks/RESULTS.md, "Weight gradients").
inline at::Tensor weight_grad(const at::Tensor& d, const at::Tensor& v) {
  return mm_narrow(d.t(), v);
}

// The input and weight gradients once the reverse recurrence has left dL/dz of every row in dz
// (and, with a projection, dL/dh_t in dh_all and m_t in m_all): a few GEMMs over the whole
// sequence. Returned as layer_backward's grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequence_grads(
    const LayerDims& d, const at::Tensor& input, const FlatSequence& seq, const at::Tensor& w_ih,
    const at::Tensor& dz, const at::Tensor& h_prev, const at::Tensor& dh_all,
    const at::Tensor& m_all) {
  return {grad_input_product(dz, w_ih).view(input.sizes()), weight_grad(dz, seq.x),
          weight_grad(dz, h_prev), dz.sum(0),
          d.proj ? weight_grad(dh_all, m_all) : at::empty({0}, dz.options())};
}

}  // namespace fused_lstm

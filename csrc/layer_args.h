// The layer ops' arguments as one carrier, LayerArgs, and their checks (each naming the argument
// and what is required). layer_ops.h builds a LayerArgs once from a call's schema arguments
// (fused_lstm/op_schemas.inc); the checks turn it into LayerParams, which every backend's kernels,
// the CUDA host path and the autograd pass on whole.
//
// Shapes (N rows: T*B padded, or sum(batch_sizes) packed; Hr = proj_size if w_hr is given,
// else H):
//   input  (T, B, I) or (N, I)     w_ih (4H, I)   w_hh (4H, Hr)   b_ih, b_hh (4H)   w_hr (Hr, H)
//   h0     (B, Hr)   c0 (B, H)     output (…, Hr) gates (…, 4H): i, f, g, o activations
//   cells  (…, H): c_t
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

namespace fused_lstm {

#define FL_CHECK_SHAPE(x, ...)                                                                 \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}),                                   \
              "fused_lstm: " #x " must have shape ", at::IntArrayRef({__VA_ARGS__}), ", got ", \
              (x).sizes())

// The regularisers and resets that end layer_forward's and layer_backward's arguments, in the
// schemas' order (meanings: fused_lstm/op_schemas.inc). The one list that the struct below, the
// ops' entry points (layer_ops.h) and lstm's saved tensors are written from: a new one is a line
// here, its check in check_regularisers, and the kernels that read it (every file it touches:
// docs/design.md, "Adding an option").
#define FL_REGULARISERS(X) X(recurrent_mask) X(zoneout_cell) X(zoneout_hidden) X(reset)

// Each may be absent. Checked against the layer (check_regularisers), then contiguous, so that
// every backend's step view points into these tensors.
struct Regularisers {
#define FL_FIELD(name) std::optional<at::Tensor> name;
  FL_REGULARISERS(FL_FIELD)
#undef FL_FIELD

  // Calls f(name, field) for each of r's fields, in the schemas' order (r const or not).
  template <class Self, typename F>
  static void each(Self& r, F&& f) {
#define FL_VISIT(name) f(#name, r.name);
    FL_REGULARISERS(FL_VISIT)
#undef FL_VISIT
  }

  bool any() const {
    bool on = false;
    each(*this, [&](const char*, const std::optional<at::Tensor>& t) { on = on || t.has_value(); });
    return on;
  }
};

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

// layer_forward's arguments (fused_lstm/op_schemas.inc).
struct LayerArgs {
  at::Tensor input;
  std::optional<at::Tensor> batch_sizes;
  at::Tensor h0, c0, w_ih, w_hh;
  std::optional<at::Tensor> b_ih, b_hh, w_hr;
  bool reverse = false;
  Regularisers regs;
};

// layer_backward's: the forward's (b_ih and b_hh unset: their gradients do not read them), the
// incoming gradients, each None where unused, and the forward's results.
struct LayerBackwardArgs {
  LayerArgs forward;
  std::optional<at::Tensor> grad_output, grad_h_n, grad_c_n;
  at::Tensor output, gates, cells;
};

// ---- the checks ---------------------------------------------------------------------------------

inline void check_same(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fused_lstm: ", name,
              " must have the dtype of input (", input.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fused_lstm: ", name,
              " must be on the device of input (", input.device(), "), got ", t.device());
}

inline LayerDims check_layer_args(const LayerArgs& a) {
  const at::Tensor &input = a.input, &w_ih = a.w_ih, &w_hh = a.w_hh, &h0 = a.h0, &c0 = a.c0;
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "fused_lstm: input must be a floating-point tensor, got ", input.scalar_type());
  TORCH_CHECK(
      input.dim() == (a.batch_sizes ? 2 : 3), "fused_lstm: input must be ",
      a.batch_sizes ? "(N, I) packed data with batch_sizes" : "(T, B, I) without batch_sizes",
      ", got ", input.dim(), "-D");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0 && w_hh.size(0) > 0,
              "fused_lstm: w_hh must be (4*hidden_size, Hr), got ", w_hh.sizes());
  LayerDims d;
  d.I = input.size(-1);
  d.H = w_hh.size(0) / 4;
  d.Hr = w_hh.size(1);
  d.proj = a.w_hr.has_value();
  d.B = h0.dim() == 2 ? h0.size(0) : -1;
  FL_CHECK_SHAPE(w_ih, 4 * d.H, d.I);
  FL_CHECK_SHAPE(h0, d.B, d.Hr);
  FL_CHECK_SHAPE(c0, d.B, d.H);
  for (const auto& [t, name] :
       {std::pair{&w_ih, "w_ih"}, {&w_hh, "w_hh"}, {&h0, "h0"}, {&c0, "c0"}}) {
    check_same(*t, name, input);
  }
  TORCH_CHECK(a.b_ih.has_value() == a.b_hh.has_value(),
              "fused_lstm: b_ih and b_hh must be given together or not at all");
  if (a.b_ih) {
    const at::Tensor &b_ih = *a.b_ih, &b_hh = *a.b_hh;
    FL_CHECK_SHAPE(b_ih, 4 * d.H);
    FL_CHECK_SHAPE(b_hh, 4 * d.H);
    check_same(b_ih, "b_ih", input);
    check_same(b_hh, "b_hh", input);
  }
  if (d.proj) {
    const at::Tensor& w_hr = *a.w_hr;
    FL_CHECK_SHAPE(w_hr, d.Hr, d.H);
    check_same(w_hr, "w_hr", input);
  } else {
    TORCH_CHECK(d.Hr == d.H, "fused_lstm: without w_hr, w_hh must be (4H, H), got ", w_hh.sizes());
  }
  if (a.batch_sizes) {
    const auto& bs = *a.batch_sizes;
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(),
                "fused_lstm: batch_sizes must be a 1-D int64 CPU tensor, got ", bs.dim(), "-D ",
                bs.scalar_type(), " on ", bs.device());
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
                  "fused_lstm: batch_sizes must be positive, non-increasing and start at "
                  "h0.size(0) = ",
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

inline void check_regularisers(const Regularisers& r, const LayerDims& d, const at::Tensor& input) {
  if (r.recurrent_mask) {
    const at::Tensor& recurrent_mask = *r.recurrent_mask;
    FL_CHECK_SHAPE(recurrent_mask, d.B, d.Hr);
    check_same(recurrent_mask, "recurrent_mask", input);
  }
  check_zoneout(r.zoneout_cell, "zoneout_cell", input, d.H);
  check_zoneout(r.zoneout_hidden, "zoneout_hidden", input, d.Hr);
  if (r.reset) {
    const auto want = input.sizes().slice(0, input.dim() - 1);
    TORCH_CHECK(r.reset->scalar_type() == at::kBool && r.reset->sizes() == want,
                "fused_lstm: reset must be a bool tensor of shape ", want, ", got ",
                r.reset->scalar_type(), " ", r.reset->sizes());
    TORCH_CHECK(r.reset->device() == input.device(),
                "fused_lstm: reset must be on the device of input (", input.device(), "), got ",
                r.reset->device());
  }
}

// An incoming gradient, which may be undefined (None): the shape of `like`, the dtype and device
// of `input`.
inline void check_grad(const std::optional<at::Tensor>& g, const char* name, const at::Tensor& like,
                       const at::Tensor& input) {
  if (!g) return;
  TORCH_CHECK(g->sizes() == like.sizes(), "fused_lstm: ", name, " must have shape ", like.sizes(),
              ", got ", g->sizes());
  check_same(*g, name, input);
}

// ---- checked arguments ----------------------------------------------------------------------

// A LayerArgs that passed its checks, with what they derive: the dimensions and the order in
// which the recurrence visits the rows. The regularisers are contiguous.
struct LayerParams : LayerArgs {
  LayerDims d{};
  StepLayout steps;

  explicit LayerParams(LayerArgs a) : LayerArgs(std::move(a)) {
    d = check_layer_args(*this);
    check_regularisers(regs, d, input);
    Regularisers::each(regs, [](const char*, std::optional<at::Tensor>& t) {
      if (t) t = t->contiguous();
    });
    steps = make_steps(input, batch_sizes, d.B, reverse);
  }

  // How the weights reach another dtype: Tensor::to where none is given; the CPU kernels pass
  // their cache of float copies (cpu/pack_cache.h).
  using WeightTo = std::function<at::Tensor(const at::Tensor&, at::ScalarType)>;

  // The same call with its floating-point tensors in dtype (reset and batch_sizes stay).
  LayerParams to(at::ScalarType dtype, const WeightTo& weight_to = {}) const {
    LayerParams p = *this;
    const auto weight = [&](const at::Tensor& t) {
      return weight_to ? weight_to(t, dtype) : t.to(dtype);
    };
    for (at::Tensor* t : {&p.input, &p.h0, &p.c0}) *t = t->to(dtype);
    for (at::Tensor* t : {&p.w_ih, &p.w_hh}) *t = weight(*t);
    for (auto* t : {&p.b_ih, &p.b_hh, &p.w_hr}) {
      if (*t) *t = weight(**t);
    }
    Regularisers::each(p.regs, [&](const char*, std::optional<at::Tensor>& t) {
      if (t && t->is_floating_point()) t = t->to(dtype);
    });
    return p;
  }
};

struct LayerBackwardParams : LayerParams {
  std::optional<at::Tensor> grad_output, grad_h_n, grad_c_n;
  at::Tensor output, gates, cells;

  // The incoming state gradients are named as the calling op names them.
  explicit LayerBackwardParams(LayerBackwardArgs a, const char* grad_h_name = "grad_h_n",
                               const char* grad_c_name = "grad_c_n")
      : LayerParams(std::move(a.forward)),
        grad_output(std::move(a.grad_output)),
        grad_h_n(std::move(a.grad_h_n)),
        grad_c_n(std::move(a.grad_c_n)),
        output(std::move(a.output)),
        gates(std::move(a.gates)),
        cells(std::move(a.cells)) {
    check_grad(grad_output, "grad_output", output, output);
    check_grad(grad_h_n, grad_h_name, h0, output);
    check_grad(grad_c_n, grad_c_name, c0, output);
  }

  LayerBackwardParams to(at::ScalarType dtype, const WeightTo& weight_to = {}) const {
    LayerBackwardParams p = *this;
    static_cast<LayerParams&>(p) = LayerParams::to(dtype, weight_to);
    for (auto* t : {&p.grad_output, &p.grad_h_n, &p.grad_c_n}) {
      if (*t) *t = (*t)->to(dtype);
    }
    for (at::Tensor* t : {&p.output, &p.gates, &p.cells}) *t = t->to(dtype);
    return p;
  }
};

}  // namespace fused_lstm

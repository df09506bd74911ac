// Autograd of the ops declared in ops.cpp, in C++ (a torch::autograd::Function per
// differentiable op, registered for the Autograd key, as torchvision does for roi_align), and the
// whole-LSTM op `lstm`, which runs every layer and direction through layer_forward.
//
// Every call of a kernel op goes through the dispatcher below autograd, so each device's kernel
// runs (or whatever a TorchDispatchMode such as fused_lstm.reference_only puts in its place) and
// torch.compile records the kernel ops in its graphs. The backwards are the kernels' handwritten
// ones; they treat the saved workspace as constants, so a second backward through them raises.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

namespace fused_lstm {

extern const char kDoubleBackwardError[] =
    "fused_lstm: double backward is not supported (differentiating gradients that were computed "
    "with create_graph=True through FusedLSTM, FusedLSTMCell, fused_lstm::lstm, "
    "fused_lstm::layer_forward or fused_lstm::cell_forward)";

namespace {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Below = at::AutoDispatchBelowADInplaceOrView;

using Tensors5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using Tensors6 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;

using LayerForwardSig = Tensors5(const Tensor&, const optional<Tensor>&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&,
                                 const optional<Tensor>&, const optional<Tensor>&,
                                 const optional<Tensor>&, bool);
using LayerBackwardSig = Tensors7(const optional<Tensor>&, const optional<Tensor>&,
                                  const optional<Tensor>&, const Tensor&, const optional<Tensor>&,
                                  const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const optional<Tensor>&, const Tensor&, const Tensor&,
                                  const Tensor&, bool);
using CellForwardSig = Tensors4(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, const optional<Tensor>&, const optional<Tensor>&);
using CellBackwardSig = Tensors6(const optional<Tensor>&, const optional<Tensor>&, const Tensor&,
                                 const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                 const Tensor&, const Tensor&);

template <class Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The kernel ops, looked up once (they are registered when the library loads).
struct KernelOps {
  c10::TypedOperatorHandle<LayerForwardSig> layer_forward;
  c10::TypedOperatorHandle<LayerBackwardSig> layer_backward;
  c10::TypedOperatorHandle<CellForwardSig> cell_forward;
  c10::TypedOperatorHandle<CellBackwardSig> cell_backward;
};

const KernelOps& ops() {
  static const KernelOps o{find<LayerForwardSig>("fused_lstm::layer_forward"),
                           find<LayerBackwardSig>("fused_lstm::layer_backward"),
                           find<CellForwardSig>("fused_lstm::cell_forward"),
                           find<CellBackwardSig>("fused_lstm::cell_backward")};
  return o;
}

optional<Tensor> opt(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

// ---- double backward ---------------------------------------------------------------------------

// The identity on a backward's gradients, with a backward that raises. Applied only under
// create_graph=True, with the incoming gradients and the saved tensors as extra inputs, so that
// any second backward reaching the gradients raises, also with allow_unused=True (which would
// read a gradient detached from its sources as zero).
struct RefuseDoubleBackward : public torch::autograd::Function<RefuseDoubleBackward> {
  static variable_list forward(AutogradContext*, at::TensorList grads, at::TensorList) {
    variable_list out;
    for (const auto& g : grads) out.push_back(g.clone());
    return out;
  }
  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK(false, kDoubleBackwardError);
  }
};

variable_list refuse_double_backward(variable_list grads, const variable_list& sources) {
  if (!at::GradMode::is_enabled()) return grads;
  variable_list live, present;
  for (const auto& s : sources) {
    if (s.defined() && s.requires_grad()) live.push_back(s);
  }
  if (live.empty()) return grads;
  for (const auto& g : grads) {
    if (g.defined()) present.push_back(g);
  }
  auto joined = RefuseDoubleBackward::apply(at::TensorList(present), at::TensorList(live));
  for (size_t i = 0, k = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) grads[i] = joined[k++];
  }
  return grads;
}

variable_list concat(std::initializer_list<variable_list> parts) {
  variable_list all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

// Each forward op's Autograd kernel: straight below autograd when nothing needs a gradient (no
// node, no saved workspace), else through its Function.

// ---- layer_forward -----------------------------------------------------------------------------

struct LayerForward : public torch::autograd::Function<LayerForward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& batch_sizes, const Tensor& h0,
                               const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               const optional<Tensor>& w_hr, bool reverse) {
    const Below below;
    auto [y, h, c, gates, cells] =
        ops().layer_forward.call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
    // The workspace is saved state for the backward, not a differentiable result; an unused
    // output's gradient reaches the backward undefined rather than as zeros.
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);
    ctx->saved_data["batch_sizes"] = batch_sizes;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = b_ih.has_value();
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, w_hr.value_or(Tensor()), y, gates, cells});
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
          opt(w_hr), y, gates, cells, ctx->saved_data["reverse"].toBool());
      g = {dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr};
    }
    g = refuse_double_backward(g, concat({{grad[0], grad[1], grad[2]}, saved}));
    const Tensor db = ctx->saved_data["has_bias"].toBool() ? g[5] : Tensor();
    return {g[0], Tensor(), g[1], g[2], g[3], g[4], db, db, w_hr.defined() ? g[6] : Tensor(),
            Tensor()};
  }
};

Tensors5 layer_forward_autograd(const Tensor& input, const optional<Tensor>& batch_sizes,
                                const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
                                const Tensor& w_hh, const optional<Tensor>& b_ih,
                                const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                                bool reverse) {
  if (!torch::autograd::compute_requires_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)) {
    const Below below;
    return ops().layer_forward.call(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                   reverse);
  }
  auto out = LayerForward::apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
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
                                 const Tensor& gates, const Tensor& cells, bool reverse) {
  const Below below;
  return ops().layer_backward.call(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0,
                                  w_ih, w_hh, w_hr, output, gates, cells, reverse);
}

Tensors6 cell_backward_autograd(const optional<Tensor>& grad_h, const optional<Tensor>& grad_c,
                                const Tensor& input, const Tensor& h0, const Tensor& c0,
                                const Tensor& w_ih, const Tensor& w_hh, const Tensor& gates,
                                const Tensor& cells) {
  const Below below;
  return ops().cell_backward.call(grad_h, grad_c, input, h0, c0, w_ih, w_hh, gates, cells);
}

// ---- lstm: every layer and direction -----------------------------------------------------------
//
// params are nn.LSTM's _flat_weights: per layer, per direction, w_ih, w_hh, [b_ih, b_hh], [w_hr].
// hx (L*D, B, Hr), cx (L*D, B, H); the output of layer l, both directions concatenated, is the
// input of layer l+1, after dropout in training (never after the last layer).

struct LstmConfig {
  bool has_biases, has_proj, train, bidirectional;
  int64_t num_layers;
  double dropout;
  int64_t dirs() const { return bidirectional ? 2 : 1; }
  int64_t per_dir() const { return 2 + 2 * has_biases + has_proj; }
  bool drops_after(int64_t layer) const {
    return train && dropout > 0 && layer < num_layers - 1;
  }
};

// One layer and direction's weights, as layer_forward takes them.
struct DirWeights {
  Tensor w_ih, w_hh;
  optional<Tensor> b_ih, b_hh, w_hr;
};

DirWeights dir_weights(const LstmConfig& cfg, at::TensorList params, int64_t index) {
  const auto w = params.slice(index * cfg.per_dir(), cfg.per_dir());
  DirWeights dw{w[0], w[1], std::nullopt, std::nullopt, std::nullopt};
  if (cfg.has_biases) dw.b_ih = w[2], dw.b_hh = w[3];
  if (cfg.has_proj) dw.w_hr = w.back();
  return dw;
}

void check_lstm_args(const LstmConfig& cfg, const Tensor& input,
                     const optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
                     at::TensorList params) {
  TORCH_CHECK(cfg.num_layers > 0, "fused_lstm: num_layers must be positive, got ",
              cfg.num_layers);
  TORCH_CHECK(cfg.dropout >= 0 && cfg.dropout <= 1, "fused_lstm: dropout must be in [0, 1], got ",
              cfg.dropout);
  const int64_t n = cfg.num_layers * cfg.dirs();
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n * cfg.per_dir(), "fused_lstm: params must "
              "hold ", cfg.per_dir(), " tensors per layer and direction (", n * cfg.per_dir(),
              " in all, w_ih, w_hh", cfg.has_biases ? ", b_ih, b_hh" : "",
              cfg.has_proj ? ", w_hr" : "", " each), got ", params.size());
  // Sizes as SymInts: under torch.export and torch.compile a check is a guard, not a
  // specialisation of the batch size.
  for (const auto& [t, name] : {std::pair{&hx, "hx"}, {&cx, "cx"}}) {
    TORCH_CHECK(t->dim() == 3, "fused_lstm: ", name, " must be (num_layers * num_directions = ",
                n, ", B, ", t == &hx ? "Hr" : "H", "), got ", t->sym_sizes());
    TORCH_SYM_CHECK(t->sym_size(0).sym_eq(n), "fused_lstm: ", name,
                    " must be (num_layers * num_directions = ", n, ", B, ",
                    t == &hx ? "Hr" : "H", "), got ", t->sym_sizes());
  }
  TORCH_SYM_CHECK(cx.sym_size(1).sym_eq(hx.sym_size(1)),
                  "fused_lstm: cx must have the batch size of hx (", hx.sym_size(1), "), got ",
                  cx.sym_size(1));
  // With batch_sizes, layer_forward checks the batch against batch_sizes[0].
  if (!batch_sizes && input.dim() == 3) {
    TORCH_SYM_CHECK(input.sym_size(1).sym_eq(hx.sym_size(1)),
                    "fused_lstm: hx must have input.size(1) = ", input.sym_size(1), " rows, got ",
                    hx.sym_size(1));
  }
}

// The dropout of ATen's RNNs (at::dropout on the CPU): a mask from torch's generator, scaled by
// 1 / (1 - p), multiplied in. The scaled mask is kept for the backward.
Tensor dropout_noise(const Tensor& x, double p) {
  if (p == 1) return at::zeros_like(x);
  return at::empty_like(x).bernoulli_(1 - p).div_(1 - p);
}

// The forward of lstm, and what its backward needs: per layer and direction (in hx's order) the
// output and workspace layer_forward returned, per layer the dropout noise applied after it
// (undefined where none).
struct LstmRun {
  Tensor output, h_n, c_n;
  std::vector<Tensor> ys, gates, cells, noise;
};

LstmRun run_lstm(const LstmConfig& cfg, const Tensor& input, const optional<Tensor>& batch_sizes,
                 const Tensor& hx, const Tensor& cx, at::TensorList params) {
  check_lstm_args(cfg, input, batch_sizes, hx, cx, params);
  LstmRun run;
  std::vector<Tensor> h_n, c_n;
  Tensor x = input;
  for (int64_t layer = 0; layer < cfg.num_layers; ++layer) {
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < cfg.dirs(); ++d) {
      const int64_t k = layer * cfg.dirs() + d;
      const DirWeights w = dir_weights(cfg, params, k);
      auto [y, h, c, gates, cells] = ops().layer_forward.call(
          x, batch_sizes, hx.select(0, k), cx.select(0, k), w.w_ih, w.w_hh, w.b_ih, w.b_hh,
          w.w_hr, d == 1);
      outs.push_back(y);
      h_n.push_back(h);
      c_n.push_back(c);
      run.ys.push_back(y);
      run.gates.push_back(gates);
      run.cells.push_back(cells);
    }
    x = outs.size() == 1 ? outs[0] : at::cat(outs, -1);
    if (cfg.drops_after(layer)) {
      run.noise.push_back(dropout_noise(x, cfg.dropout));
      x = x * run.noise.back();
    } else if (layer < cfg.num_layers - 1) {
      run.noise.emplace_back();
    }
  }
  run.output = x;
  run.h_n = at::stack(h_n);
  run.c_n = at::stack(c_n);
  return run;
}

// The input of layer `layer` > 0, rebuilt in the backward from the saved outputs of the layer
// below rather than saved.
Tensor layer_input(const LstmConfig& cfg, int64_t layer, const variable_list& ys,
                   const variable_list& noise) {
  const auto below = at::TensorList(ys).slice((layer - 1) * cfg.dirs(), cfg.dirs());
  Tensor x = below.size() == 1 ? below[0] : at::cat(below, -1);
  const Tensor& mask = noise[layer - 1];
  return mask.defined() ? x * mask : x;
}

LstmConfig config(bool has_biases, bool has_proj, int64_t num_layers, double dropout, bool train,
                  bool bidirectional) {
  return {has_biases, has_proj, train, bidirectional, num_layers, dropout};
}

void save_config(AutogradContext* ctx, const LstmConfig& cfg) {
  auto& s = ctx->saved_data;
  s["has_biases"] = cfg.has_biases, s["has_proj"] = cfg.has_proj, s["train"] = cfg.train;
  s["bidirectional"] = cfg.bidirectional, s["num_layers"] = cfg.num_layers;
  s["dropout"] = cfg.dropout;
}

LstmConfig load_config(AutogradContext* ctx) {
  auto& s = ctx->saved_data;
  return config(s["has_biases"].toBool(), s["has_proj"].toBool(), s["num_layers"].toInt(),
                s["dropout"].toDouble(), s["train"].toBool(), s["bidirectional"].toBool());
}

struct Lstm : public torch::autograd::Function<Lstm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& batch_sizes, const Tensor& hx,
                               const Tensor& cx, at::TensorList params, bool has_biases,
                               bool has_proj, int64_t num_layers, double dropout, bool train,
                               bool bidirectional) {
    const Below below;
    const LstmConfig cfg = config(has_biases, has_proj, num_layers, dropout, train, bidirectional);
    LstmRun run = run_lstm(cfg, input, batch_sizes, hx, cx, params);
    ctx->set_materialize_grads(false);
    ctx->saved_data["batch_sizes"] = batch_sizes;
    save_config(ctx, cfg);
    // input, hx, cx, params, then per layer and direction y, gates, cells, then the noise.
    variable_list saved{input, hx, cx};
    saved.insert(saved.end(), params.begin(), params.end());
    for (size_t k = 0; k < run.ys.size(); ++k) {
      saved.insert(saved.end(), {run.ys[k], run.gates[k], run.cells[k]});
    }
    saved.insert(saved.end(), run.noise.begin(), run.noise.end());
    ctx->save_for_backward(saved);
    return {run.output, run.h_n, run.c_n};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto saved = ctx->get_saved_variables();
    const LstmConfig cfg = load_config(ctx);
    const auto batch_sizes = ctx->saved_data["batch_sizes"].toOptional<Tensor>();
    const int64_t L = cfg.num_layers, D = cfg.dirs(), n_params = L * D * cfg.per_dir();
    const Tensor &input = saved[0], &hx = saved[1], &cx = saved[2];
    const variable_list params(saved.begin() + 3, saved.begin() + 3 + n_params);
    variable_list ys, gates, cells;
    for (int64_t k = 0; k < L * D; ++k) {
      const auto* s = &saved[3 + n_params + 3 * k];
      ys.push_back(s[0]);
      gates.push_back(s[1]);
      cells.push_back(s[2]);
    }
    const variable_list noise(saved.begin() + 3 + n_params + 3 * L * D, saved.end());
    const Tensor &grad_output = grad[0], &grad_h_n = grad[1], &grad_c_n = grad[2];
    const c10::SymInt Hr = hx.sym_size(-1);

    variable_list grads(3 + n_params);  // input, hx, cx, params
    {
      const Below below;
      std::vector<Tensor> dh0(L * D), dc0(L * D);
      Tensor dx = grad_output;  // dL/d(output of the layer being visited)
      for (int64_t layer = L - 1; layer >= 0; --layer) {
        const Tensor x = layer == 0 ? input : layer_input(cfg, layer, ys, noise);
        Tensor dx_below;
        for (int64_t d = 0; d < D; ++d) {
          const int64_t k = layer * D + d;
          const DirWeights w = dir_weights(cfg, params, k);
          optional<Tensor> dy;
          if (dx.defined()) dy = D == 1 ? dx : dx.narrow_symint(-1, d * Hr, Hr);
          auto [gx, gh0, gc0, gw_ih, gw_hh, gb, gw_hr] = ops().layer_backward.call(
              dy, grad_h_n.defined() ? opt(grad_h_n.select(0, k)) : std::nullopt,
              grad_c_n.defined() ? opt(grad_c_n.select(0, k)) : std::nullopt, x, batch_sizes,
              hx.select(0, k), cx.select(0, k), w.w_ih, w.w_hh, w.w_hr, ys[k], gates[k],
              cells[k], d == 1);
          dx_below = dx_below.defined() ? dx_below + gx : gx;
          dh0[k] = gh0;
          dc0[k] = gc0;
          Tensor* g = &grads[3 + k * cfg.per_dir()];
          g[0] = gw_ih;
          g[1] = gw_hh;
          if (cfg.has_biases) g[2] = g[3] = gb;
          if (cfg.has_proj) g[cfg.per_dir() - 1] = gw_hr;
        }
        dx = layer > 0 && noise[layer - 1].defined() ? dx_below * noise[layer - 1] : dx_below;
      }
      grads[0] = dx;
      grads[1] = at::stack(dh0);
      grads[2] = at::stack(dc0);
    }
    grads = refuse_double_backward(grads, concat({{grad_output, grad_h_n, grad_c_n}, saved}));
    // lstm's arguments: input, batch_sizes, hx, cx, params..., then six flags.
    variable_list out{grads[0], Tensor(), grads[1], grads[2]};
    out.insert(out.end(), grads.begin() + 3, grads.end());
    out.resize(out.size() + 6);
    return out;
  }
};

Tensors3 lstm_composite(const Tensor& input, const optional<Tensor>& batch_sizes, const Tensor& hx,
                        const Tensor& cx, at::TensorList params, bool has_biases, bool has_proj,
                        int64_t num_layers, double dropout, bool train, bool bidirectional) {
  LstmRun run = run_lstm(config(has_biases, has_proj, num_layers, dropout, train, bidirectional),
                         input, batch_sizes, hx, cx, params);
  return {run.output, run.h_n, run.c_n};
}

Tensors3 lstm_autograd(const Tensor& input, const optional<Tensor>& batch_sizes, const Tensor& hx,
                       const Tensor& cx, at::TensorList params, bool has_biases, bool has_proj,
                       int64_t num_layers, double dropout, bool train, bool bidirectional) {
  // Nothing to differentiate: the kernel below autograd, no workspace kept. It calls
  // layer_forward itself rather than redispatching lstm, so that a TorchDispatchMode that
  // replaces the kernel ops (fused_lstm.reference_only) sees every call.
  if (!torch::autograd::compute_requires_grad(input, hx, cx, params)) {
    const Below below;
    return lstm_composite(input, batch_sizes, hx, cx, params, has_biases, has_proj, num_layers,
                          dropout, train, bidirectional);
  }
  auto out = Lstm::apply(input, batch_sizes, hx, cx, params, has_biases, has_proj, num_layers,
                         dropout, train, bidirectional);
  return {out[0], out[1], out[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) {
  m.impl("lstm", &lstm_autograd);
  m.impl("layer_forward", &layer_forward_autograd);
  m.impl("layer_backward", &layer_backward_autograd);
  m.impl("cell_forward", &cell_forward_autograd);
  m.impl("cell_backward", &cell_backward_autograd);
}

TORCH_LIBRARY_IMPL(fused_lstm, CompositeExplicitAutograd, m) {
  m.impl("lstm", &lstm_composite);
}

}  // namespace fused_lstm

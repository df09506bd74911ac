// The whole-LSTM op fused_lstm::lstm (schema: fused_lstm/op_schemas.inc), like aten::lstm: every
// layer and direction through the kernel op layer_forward via the dispatcher, nn.LSTM's dropout
// between layers, the regularisers' masks drawn here; and its autograd, whose backward runs
// layer_backward per layer, last layer first.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <numeric>
#include <vector>

#include "op_handles.h"

namespace fused_lstm {
namespace autograd {
namespace {

// params are nn.LSTM's _flat_weights: per layer, per direction, w_ih, w_hh, [b_ih, b_hh], [w_hr].
// hx (L*D, B, Hr), cx (L*D, B, H); the output of layer l, both directions concatenated, is the
// input of layer l+1, after dropout in training (never after the last layer).

// lstm's options: its arguments after params but reset. fields() is their one table, by name,
// which the entry point below fills and the autograd saves and loads.
struct LstmConfig {
  bool has_biases, has_proj;
  int64_t num_layers;
  double dropout;
  bool train, bidirectional;
  double recurrent_dropout, zoneout_cell, zoneout_hidden, weight_drop;

  template <class Self, class F>
  static void fields(Self& c, F&& f) {
    f("has_biases", c.has_biases), f("has_proj", c.has_proj), f("num_layers", c.num_layers);
    f("dropout", c.dropout), f("train", c.train), f("bidirectional", c.bidirectional);
    f("recurrent_dropout", c.recurrent_dropout), f("zoneout_cell", c.zoneout_cell);
    f("zoneout_hidden", c.zoneout_hidden), f("weight_drop", c.weight_drop);
  }

  void save(AutogradContext* ctx) const {
    fields(*this, [&](const char* name, const auto& v) { ctx->saved_data[name] = v; });
  }
  static LstmConfig load(AutogradContext* ctx) {
    LstmConfig c;
    fields(c, [&](const char* name, auto& v) {
      v = ctx->saved_data[name].to<std::decay_t<decltype(v)>>();
    });
    return c;
  }

  int64_t dirs() const { return bidirectional ? 2 : 1; }
  int64_t per_dir() const { return 2 + 2 * has_biases + has_proj; }
  bool drops_after(int64_t layer) const { return train && dropout > 0 && layer < num_layers - 1; }
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

void check_rate(double p, const char* name, bool one_allowed) {
  TORCH_CHECK(p >= 0 && (one_allowed ? p <= 1 : p < 1), "fused_lstm: ", name, " must be in [0, ",
              one_allowed ? "1]" : "1)", ", got ", p);
}

void check_lstm_args(const LstmConfig& cfg, const Tensor& input,
                     const optional<Tensor>& batch_sizes, const Tensor& hx, const Tensor& cx,
                     at::TensorList params, const optional<Tensor>& reset) {
  TORCH_CHECK(cfg.num_layers > 0, "fused_lstm: num_layers must be positive, got ", cfg.num_layers);
  check_rate(cfg.dropout, "dropout", true);
  check_rate(cfg.recurrent_dropout, "recurrent_dropout", false);
  check_rate(cfg.zoneout_cell, "zoneout_cell", true);
  check_rate(cfg.zoneout_hidden, "zoneout_hidden", true);
  check_rate(cfg.weight_drop, "weight_drop", false);
  const int64_t n = cfg.num_layers * cfg.dirs();
  TORCH_CHECK(static_cast<int64_t>(params.size()) == n * cfg.per_dir(),
              "fused_lstm: params must hold ", cfg.per_dir(), " tensors per layer and direction (",
              n * cfg.per_dir(), " in all, w_ih, w_hh", cfg.has_biases ? ", b_ih, b_hh" : "",
              cfg.has_proj ? ", w_hr" : "", " each), got ", params.size());
  // Sizes as SymInts: under torch.export and torch.compile a check is a guard, not a
  // specialisation of the batch size.
  for (const auto& [t, name] : {std::pair{&hx, "hx"}, {&cx, "cx"}}) {
    TORCH_CHECK(t->dim() == 3, "fused_lstm: ", name, " must be (num_layers * num_directions = ", n,
                ", B, ", t == &hx ? "Hr" : "H", "), got ", t->sym_sizes());
    TORCH_SYM_CHECK(t->sym_size(0).sym_eq(n), "fused_lstm: ", name,
                    " must be (num_layers * num_directions = ", n, ", B, ", t == &hx ? "Hr" : "H",
                    "), got ", t->sym_sizes());
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
  if (reset) {
    const auto want = input.sym_sizes().slice(0, input.dim() - 1);
    TORCH_CHECK(reset->scalar_type() == at::kBool, "fused_lstm: reset must be a bool tensor, got ",
                reset->scalar_type());
    TORCH_CHECK(reset->device() == input.device(),
                "fused_lstm: reset must be on the device of input (", input.device(), "), got ",
                reset->device());
    TORCH_CHECK(reset->dim() == input.dim() - 1,
                "fused_lstm: reset must have input's shape without its last dimension, ", want,
                ", got ", reset->sym_sizes());
    for (int64_t k = 0; k < reset->dim(); ++k) {
      TORCH_SYM_CHECK(reset->sym_size(k).sym_eq(want[k]),
                      "fused_lstm: reset must have input's shape without its last dimension, ",
                      want, ", got ", reset->sym_sizes());
    }
  }
}

// The dropout of ATen's RNNs (at::dropout on the CPU): a mask from torch's generator, scaled by
// 1 / (1 - p), multiplied in. The scaled mask is kept for the backward.
Tensor dropout_noise(const Tensor& x, double p) {
  if (p == 1) return at::zeros_like(x);
  return at::empty_like(x, at::MemoryFormat::Contiguous).bernoulli_(1 - p).div_(1 - p);
}

// The mask of recurrent dropout or weight drop shaped like x: 0, or 1 / (1 - p) kept.
Tensor drop_mask(const Tensor& x, double p) {
  return ops().keep_mask.call(x, x.sym_sizes(), 1 - p, 1 / (1 - p));
}

// A zoneout weight for layer_forward: per step and unit keep masks drawn at `rate` in training,
// shaped like the layer's cells (width H) or output (width Hr); the rate itself in eval.
optional<Tensor> zoneout_weights(const LstmConfig& cfg, double rate, const Tensor& input,
                                 const c10::SymInt& width) {
  if (rate == 0) return std::nullopt;
  if (!cfg.train) return at::scalar_tensor(rate, input.options());
  auto sizes = input.sym_sizes().vec();
  sizes.back() = width;
  return ops().keep_mask.call(input, sizes, rate, 1);
}

// reset as the reverse direction visits the rows: a row's flag is that of the same batch row
// at the next step (where it is active there), since the sequence starting there takes no
// state from this one. Packed, step t's flags are the first batch_sizes[t + 1] flags of step
// t + 1, then false. Made of views and one cat: nothing is copied from the host and nothing
// waits for the device, so a call with reset stays capturable in a CUDA graph.
Tensor reset_for_reverse(const Tensor& reset, const optional<Tensor>& batch_sizes) {
  if (!batch_sizes) {
    return at::cat({reset.slice(0, 1), at::zeros_like(reset.slice(0, 0, 1))}, 0);
  }
  const auto bs = batch_sizes->contiguous();
  const int64_t* p = bs.const_data_ptr<int64_t>();
  const int64_t T = bs.numel(), N = reset.size(0);
  const int64_t rows = std::accumulate(p, p + T, int64_t{0});
  TORCH_CHECK(rows == N, "fused_lstm: input has ", N, " rows but batch_sizes sum to ", rows);
  const Tensor none = at::zeros({T > 0 ? p[0] : 0}, reset.options());
  std::vector<Tensor> parts;
  parts.reserve(2 * T);
  for (int64_t t = 0, start = 0; t < T; start += p[t], ++t) {
    const int64_t next = t + 1 < T ? p[t + 1] : 0;
    parts.push_back(reset.narrow(0, start + p[t], next));
    parts.push_back(none.narrow(0, 0, p[t] - next));
  }
  return at::cat(parts);
}

// The regularisers of one layer and direction: what layer_forward takes (with the resets as
// that direction visits the rows), and the weight-drop mask applied to its w_hh (undefined
// where off).
struct DirRegularisers {
  Tensor weight_mask;
  Regularisers regs;
};

DirRegularisers draw_regularisers(const LstmConfig& cfg, const Tensor& x, const Tensor& h0,
                                  const DirWeights& w, const optional<Tensor>& reset) {
  DirRegularisers r;
  if (cfg.train && cfg.weight_drop > 0) r.weight_mask = drop_mask(w.w_hh, cfg.weight_drop);
  if (cfg.train && cfg.recurrent_dropout > 0) {
    r.regs.recurrent_mask = drop_mask(h0, cfg.recurrent_dropout);
  }
  r.regs.zoneout_cell = zoneout_weights(cfg, cfg.zoneout_cell, x, w.w_hh.sym_size(0) / 4);
  r.regs.zoneout_hidden = zoneout_weights(cfg, cfg.zoneout_hidden, x, h0.sym_size(-1));
  r.regs.reset = reset;
  return r;
}

Tensor dropped(const Tensor& w_hh, const Tensor& weight_mask) {
  return weight_mask.defined() ? w_hh * weight_mask : w_hh;
}

// The forward of lstm, and what its backward needs: per layer and direction (in hx's order) the
// output and workspace layer_forward returned and the regularisers drawn, per layer the dropout
// noise applied after it (undefined where none).
struct LstmRun {
  Tensor output, h_n, c_n;
  std::vector<Tensor> ys, gates, cells, noise;
  std::vector<DirRegularisers> regs;
};

LstmRun run_lstm(const LstmConfig& cfg, const Tensor& input, const optional<Tensor>& batch_sizes,
                 const Tensor& hx, const Tensor& cx, at::TensorList params,
                 const optional<Tensor>& reset) {
  check_lstm_args(cfg, input, batch_sizes, hx, cx, params, reset);
  LstmRun run;
  optional<Tensor> resets[2];
  if (reset) {
    resets[0] = reset;
    if (cfg.bidirectional) resets[1] = reset_for_reverse(*reset, batch_sizes);
  }
  std::vector<Tensor> h_n, c_n;
  Tensor x = input;
  for (int64_t layer = 0; layer < cfg.num_layers; ++layer) {
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < cfg.dirs(); ++d) {
      const int64_t k = layer * cfg.dirs() + d;
      const DirWeights w = dir_weights(cfg, params, k);
      const Tensor h0 = hx.select(0, k);
      DirRegularisers r = draw_regularisers(cfg, x, h0, w, resets[d]);
      auto [y, h, c, gates, cells] =
          call_layer_forward(ops().layer_forward, {.input = x,
                                                   .batch_sizes = batch_sizes,
                                                   .h0 = h0,
                                                   .c0 = cx.select(0, k),
                                                   .w_ih = w.w_ih,
                                                   .w_hh = dropped(w.w_hh, r.weight_mask),
                                                   .b_ih = w.b_ih,
                                                   .b_hh = w.b_hh,
                                                   .w_hr = w.w_hr,
                                                   .reverse = d == 1,
                                                   .regs = r.regs});
      outs.push_back(y);
      h_n.push_back(h);
      c_n.push_back(c);
      run.ys.push_back(y);
      run.gates.push_back(gates);
      run.cells.push_back(cells);
      run.regs.push_back(std::move(r));
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

// What lstm's backward reads, by name. save_for_backward takes one flat list of tensors; pack
// lays the fields out in it and unpack reads them back by the same layout, which the config's
// counts (layers, directions, tensors per direction) determine.
struct LstmSaved {
  Tensor input, hx, cx;
  variable_list params;
  // Per layer and direction, in hx's order: layer_forward's output and workspace, and the
  // regularisers drawn for it.
  variable_list ys, gates, cells;
  std::vector<DirRegularisers> regs;
  // Per layer but the last: the dropout noise applied after it (undefined where none).
  variable_list noise;

  variable_list pack() const {
    variable_list out{input, hx, cx};
    out.insert(out.end(), params.begin(), params.end());
    for (size_t k = 0; k < ys.size(); ++k) {
      out.insert(out.end(), {ys[k], gates[k], cells[k], regs[k].weight_mask});
      save_regularisers(out, regs[k].regs);
    }
    out.insert(out.end(), noise.begin(), noise.end());
    return out;
  }

  static LstmSaved unpack(const LstmConfig& cfg, const variable_list& saved) {
    const int64_t dirs = cfg.num_layers * cfg.dirs(), n_params = dirs * cfg.per_dir();
    LstmSaved v;
    auto it = saved.cbegin();
    v.input = *it++, v.hx = *it++, v.cx = *it++;
    v.params.assign(it, it + n_params);
    it += n_params;
    for (int64_t k = 0; k < dirs; ++k) {
      v.ys.push_back(*it++);
      v.gates.push_back(*it++);
      v.cells.push_back(*it++);
      const Tensor weight_mask = *it++;
      v.regs.push_back({weight_mask, load_regularisers(it)});
    }
    v.noise.assign(it, it + (cfg.num_layers - 1));
    it += cfg.num_layers - 1;
    TORCH_INTERNAL_ASSERT(it == saved.cend(),
                          "fused_lstm: lstm's saved tensors do not match the layout of its config");
    return v;
  }
};

struct Lstm : public torch::autograd::Function<Lstm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input,
                               const optional<Tensor>& batch_sizes, const Tensor& hx,
                               const Tensor& cx, at::TensorList params, const LstmConfig& cfg,
                               const optional<Tensor>& reset) {
    const Below below;
    LstmRun run = run_lstm(cfg, input, batch_sizes, hx, cx, params, reset);
    ctx->set_materialize_grads(false);
    ctx->saved_data["batch_sizes"] = batch_sizes;
    cfg.save(ctx);
    const LstmSaved saved{input,     hx,        cx,       params.vec(), run.ys,
                          run.gates, run.cells, run.regs, run.noise};
    ctx->save_for_backward(saved.pack());
    return {run.output, run.h_n, run.c_n};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grad) {
    const auto saved_list = ctx->get_saved_variables();
    const LstmConfig cfg = LstmConfig::load(ctx);
    const auto batch_sizes = ctx->saved_data["batch_sizes"].toOptional<Tensor>();
    const int64_t L = cfg.num_layers, D = cfg.dirs(), n_params = L * D * cfg.per_dir();
    const LstmSaved saved = LstmSaved::unpack(cfg, saved_list);
    const Tensor &input = saved.input, &hx = saved.hx, &cx = saved.cx;
    const variable_list &params = saved.params, &ys = saved.ys, &gates = saved.gates,
                        &cells = saved.cells, &noise = saved.noise;
    const std::vector<DirRegularisers>& regs = saved.regs;
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
          const DirRegularisers& r = regs[k];
          optional<Tensor> dy;
          if (dx.defined()) dy = D == 1 ? dx : dx.narrow_symint(-1, d * Hr, Hr);
          auto [gx, gh0, gc0, gw_ih, gw_hh, gb, gw_hr] = call_layer_backward(
              ops().layer_backward,
              {.forward = {.input = x,
                           .batch_sizes = batch_sizes,
                           .h0 = hx.select(0, k),
                           .c0 = cx.select(0, k),
                           .w_ih = w.w_ih,
                           .w_hh = dropped(w.w_hh, r.weight_mask),
                           .w_hr = w.w_hr,
                           .reverse = d == 1,
                           .regs = r.regs},
               .grad_output = dy,
               .grad_h_n = grad_h_n.defined() ? opt(grad_h_n.select(0, k)) : std::nullopt,
               .grad_c_n = grad_c_n.defined() ? opt(grad_c_n.select(0, k)) : std::nullopt,
               .output = ys[k],
               .gates = gates[k],
               .cells = cells[k]});
          dx_below = dx_below.defined() ? dx_below + gx : gx;
          dh0[k] = gh0;
          dc0[k] = gc0;
          Tensor* g = &grads[3 + k * cfg.per_dir()];
          g[0] = gw_ih;
          g[1] = dropped(gw_hh, r.weight_mask);
          if (cfg.has_biases) g[2] = g[3] = gb;
          if (cfg.has_proj) g[cfg.per_dir() - 1] = gw_hr;
        }
        dx = layer > 0 && noise[layer - 1].defined() ? dx_below * noise[layer - 1] : dx_below;
      }
      grads[0] = dx;
      grads[1] = at::stack(dh0);
      grads[2] = at::stack(dc0);
    }
    grads = refuse_double_backward(grads, concat({{grad_output, grad_h_n, grad_c_n}, saved_list}));
    // Function::apply's arguments: input, batch_sizes, hx, cx, params..., cfg, reset.
    variable_list out{grads[0], Tensor(), grads[1], grads[2]};
    out.insert(out.end(), grads.begin() + 3, grads.end());
    out.resize(out.size() + 2);
    return out;
  }
};

Tensors3 lstm_composite(const Tensor& input, const optional<Tensor>& batch_sizes, const Tensor& hx,
                        const Tensor& cx, at::TensorList params, const optional<Tensor>& reset,
                        const LstmConfig& cfg) {
  LstmRun run = run_lstm(cfg, input, batch_sizes, hx, cx, params, reset);
  return {run.output, run.h_n, run.c_n};
}

Tensors3 lstm_autograd(const Tensor& input, const optional<Tensor>& batch_sizes, const Tensor& hx,
                       const Tensor& cx, at::TensorList params, const optional<Tensor>& reset,
                       const LstmConfig& cfg) {
  // Nothing to differentiate: the kernel below autograd, no workspace kept. It calls
  // layer_forward itself rather than redispatching lstm, so that a TorchDispatchMode that
  // replaces the kernel ops (fused_lstm.reference_only) sees every call.
  if (!torch::autograd::compute_requires_grad(input, hx, cx, params)) {
    const Below below;
    return lstm_composite(input, batch_sizes, hx, cx, params, reset, cfg);
  }
  auto out = Lstm::apply(input, batch_sizes, hx, cx, params, cfg, reset);
  return {out[0], out[1], out[2]};
}

// lstm's schema arguments as a call of Impl, its options as one LstmConfig.
template <Tensors3 (*Impl)(const Tensor&, const optional<Tensor>&, const Tensor&, const Tensor&,
                           at::TensorList, const optional<Tensor>&, const LstmConfig&)>
Tensors3 lstm_entry(const Tensor& input, const optional<Tensor>& batch_sizes, const Tensor& hx,
                    const Tensor& cx, at::TensorList params, bool has_biases, bool has_proj,
                    int64_t num_layers, double dropout, bool train, bool bidirectional,
                    const optional<Tensor>& reset, double recurrent_dropout, double zoneout_cell,
                    double zoneout_hidden, double weight_drop) {
  return Impl(input, batch_sizes, hx, cx, params, reset,
              {.has_biases = has_biases,
               .has_proj = has_proj,
               .num_layers = num_layers,
               .dropout = dropout,
               .train = train,
               .bidirectional = bidirectional,
               .recurrent_dropout = recurrent_dropout,
               .zoneout_cell = zoneout_cell,
               .zoneout_hidden = zoneout_hidden,
               .weight_drop = weight_drop});
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, Autograd, m) { m.impl("lstm", &lstm_entry<&lstm_autograd>); }

TORCH_LIBRARY_IMPL(fused_lstm, CompositeExplicitAutograd, m) {
  m.impl("lstm", &lstm_entry<&lstm_composite>);
}

}  // namespace autograd
}  // namespace fused_lstm

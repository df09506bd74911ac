// What the autograd kernels share: the ops they call through the dispatcher, looked up once,
// typed with the entry points' signatures (layer_ops.h); the regularisers' place in a saved
// tensor list; and the guard that makes a second backward through the handwritten backwards
// raise.
//
// Every call of a kernel op goes through the dispatcher below autograd, so each device's kernel
// runs (or whatever a TorchDispatchMode such as fused_lstm.reference_only puts in its place) and
// torch.compile records the kernel ops in its graphs.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../layer_ops.h"

namespace fused_lstm {

extern const char kDoubleBackwardError[];  // kernel_ops.cpp

namespace autograd {

using at::Tensor;
using std::optional;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Below = at::AutoDispatchBelowADInplaceOrView;

using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;

using CellForwardSig = std::remove_pointer_t<decltype(&cell_forward_op<AnyImpl>)>;
using CellBackwardSig = std::remove_pointer_t<decltype(&cell_backward_op<AnyImpl>)>;
using KeepMaskSig = Tensor(const Tensor&, c10::SymIntArrayRef, double, double);

template <class Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The ops called here, looked up once (they are registered when the library loads).
struct Ops {
  c10::TypedOperatorHandle<LayerForwardSig> layer_forward;
  c10::TypedOperatorHandle<LayerBackwardSig> layer_backward;
  c10::TypedOperatorHandle<CellForwardSig> cell_forward;
  c10::TypedOperatorHandle<CellBackwardSig> cell_backward;
  c10::TypedOperatorHandle<KeepMaskSig> keep_mask;
};

inline const Ops& ops() {
  static const Ops o{find<LayerForwardSig>("fused_lstm::layer_forward"),
                     find<LayerBackwardSig>("fused_lstm::layer_backward"),
                     find<CellForwardSig>("fused_lstm::cell_forward"),
                     find<CellBackwardSig>("fused_lstm::cell_backward"),
                     find<KeepMaskSig>("fused_lstm::keep_mask")};
  return o;
}

inline optional<Tensor> opt(const Tensor& t) {
  return t.defined() ? optional<Tensor>(t) : std::nullopt;
}

// The regularisers in a saved tensor list (undefined where absent), and read back from it at
// `it`, which moves past them.
inline void save_regularisers(variable_list& out, const Regularisers& r) {
  Regularisers::each(
      r, [&](const char*, const optional<Tensor>& t) { out.push_back(t.value_or(Tensor())); });
}

inline Regularisers load_regularisers(variable_list::const_iterator& it) {
  Regularisers r;
  Regularisers::each(r, [&](const char*, optional<Tensor>& t) { t = opt(*it++); });
  return r;
}

inline variable_list concat(std::initializer_list<variable_list> parts) {
  variable_list all;
  for (const auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

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

inline variable_list refuse_double_backward(variable_list grads, const variable_list& sources) {
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

}  // namespace autograd
}  // namespace fused_lstm

// Which library computes a CPU product over the whole sequence: oneDNN's matmul, ATen's GEMM
// (MKL), or ATen's GEMM on the transposed product, by the rules of ../tuning.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>

#include "../tuning.h"

namespace fused_lstm {

// oneDNN's matmul on dense tensors, as the dispatcher op mkldnn::_linear_pointwise (Inductor's
// CPU linear), looked up once: a torch built without oneDNN lacks it and ATen's GEMM serves.
inline const std::optional<c10::OperatorHandle>& onednn_linear() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

// Whether x (M, K) times a (K, N) operand goes to onednn_linear.
inline bool use_onednn(const at::Tensor& x, int64_t N) {
  return x.scalar_type() == at::kFloat && x.size(0) * x.size(1) * N >= tuning::kOneDnnWork &&
         onednn_linear();
}

// x w^T (+ bias) through onednn_linear; x (M, K), w (N, K), any strides.
inline at::Tensor onednn_mm(const at::Tensor& x, const at::Tensor& w,
                            const std::optional<at::Tensor>& bias) {
  torch::jit::Stack stack{x,
                          w,
                          bias,
                          c10::string_view("none"),
                          c10::List<std::optional<at::Scalar>>(),
                          c10::string_view("")};
  onednn_linear()->callBoxed(stack);
  return stack.back().toTensor();
}

// a @ b with ATen's GEMM; a narrow product (tuning::kNarrowColumns) is computed transposed.
inline at::Tensor mm_narrow(const at::Tensor& a, const at::Tensor& b) {
  if (b.size(1) >= tuning::kNarrowColumns) return at::mm(a, b);
  return at::mm(b.t(), a.t()).t().contiguous();
}

// sequence_grads' products on the CPU (layer_buffers.h).
struct CpuProducts {
  // dz @ W_ih: large float32 products go to oneDNN (use_onednn), which copies W_ih^T first (a
  // weight, once per call).
  static at::Tensor grad_input(const at::Tensor& dz, const at::Tensor& w_ih) {
    if (use_onednn(dz, w_ih.size(1))) return onednn_mm(dz, w_ih.t(), std::nullopt);
    return mm_narrow(dz, w_ih);
  }
  // d^T v: always ATen's GEMM, which reads the transposed d where it is. oneDNN's linear would
  // first copy d^T and v^T, two sequence-sized tensors, and was the slower for it
  // (benchmarks/RESULTS.md, "Weight gradients").
  static at::Tensor weight(const at::Tensor& d, const at::Tensor& v) { return mm_narrow(d.t(), v); }
};

}  // namespace fused_lstm

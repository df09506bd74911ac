// The products over the whole sequence: the input projection (oneDNN, ATen, or a loop at a
// cell step's sizes) and the loops that replace the closing gradient GEMMs at small sizes.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../tuning.h"
#include "gemm_routing.h"

namespace fused_lstm {
// Internal to lstm_cpu.cpp, the one file that includes this header: its definitions keep that
// file's internal linkage, so that the compiler sees the loops whole and inlines across headers.
namespace {

using namespace tuning;

// x W_ih^T (+ b_ih + b_hh): the gates' pre-activations from the input, for the whole sequence.
at::Tensor input_projection(const at::Tensor& x, const at::Tensor& w_ih,
                            const std::optional<at::Tensor>& b_ih,
                            const std::optional<at::Tensor>& b_hh) {
  const std::optional<at::Tensor> bias =
      b_ih ? std::optional<at::Tensor>(*b_ih + *b_hh) : std::nullopt;
  if (use_onednn(x, w_ih.size(0))) return onednn_mm(x, w_ih, bias);
  return bias ? at::addmm(*bias, x, w_ih.t()) : at::mm(x, w_ih.t());
}

// z[r] = x[r] W_ih^T (+ b_ih + b_hh) for rows r of x (rows, I); W_ih (G, I); z (rows, G).
template <typename T>
void small_input_projection(const T* __restrict x, int64_t rows, int64_t I,
                            const T* __restrict w_ih, int64_t G, const T* b_ih, const T* b_hh,
                            T* __restrict z) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      T sum = b_ih ? b_ih[g] + b_hh[g] : T(0);
      for (int64_t i = 0; i < I; ++i) sum += x[r * I + i] * w_ih[g * I + i];
      z[r * G + g] = sum;
    }
  }
}

// sequence_grads without a projection in one pass over dz (rows, G): grad_input = dz W_ih,
// grad_w_ih = dz^T x, grad_w_hh = dz^T h_prev, grad_bias = the sum of dz's rows, each summed
// over rows in order. The outputs come zeroed.
template <typename T>
void small_sequence_grads(const T* __restrict dz, int64_t rows, int64_t G, const T* __restrict x,
                          int64_t I, const T* __restrict h_prev, int64_t Hr,
                          const T* __restrict w_ih, T* __restrict grad_x, T* __restrict grad_w_ih,
                          T* __restrict grad_w_hh, T* __restrict grad_bias) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * I;
    const T* hr = h_prev + r * Hr;
    T* gxr = grad_x + r * I;
    for (int64_t g = 0; g < G; ++g) {
      const T d = dz[r * G + g];
      grad_bias[g] += d;
      for (int64_t i = 0; i < I; ++i) {
        gxr[i] += d * w_ih[g * I + i];
        grad_w_ih[g * I + i] += d * xr[i];
      }
      for (int64_t j = 0; j < Hr; ++j) grad_w_hh[g * Hr + j] += d * hr[j];
    }
  }
}

}  // namespace
}  // namespace fused_lstm

// The ATen work around the per-step loops that is the same on every device: the layer's
// (rows, width) buffers viewed in input's shape and back, and the closing GEMMs of the backward.
// Each backend passes the products it routes (cpu/gemm_routing.h; cuBLAS in lstm_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "layer_args.h"

namespace fused_lstm {

// A (rows, width) buffer viewed in input's leading shape: (T, B, width) padded, (N, width) packed.
inline at::Tensor shaped_like_input(const at::Tensor& input, const at::Tensor& t) {
  return t.view(lead_with(input, t.size(1)));
}

// layer_backward's sequence tensors as contiguous (rows, width) matrices; dy is undefined when
// grad_output is None.
struct FlatSequence {
  at::Tensor x, acts, cells, y, dy;
};

inline FlatSequence flatten_sequence(const LayerBackwardParams& p) {
  const LayerDims& d = p.d;
  return {p.input.reshape({-1, d.I}), p.gates.reshape({-1, 4 * d.H}).contiguous(),
          p.cells.reshape({-1, d.H}).contiguous(), p.output.reshape({-1, d.Hr}).contiguous(),
          p.grad_output ? p.grad_output->reshape({-1, d.Hr}).contiguous() : at::Tensor()};
}

// The input and weight gradients once the reverse recurrence has left dL/dz of every row in dz
// (and, with a projection, dL/dh_t in dh_all and m_t in m_all): a few GEMMs over the whole
// sequence. Products::grad_input(dz, w_ih) is dz @ w_ih, Products::weight(d, v) is d^T v summed
// over the rows. Returned as layer_backward's grad_input, grad_w_ih, grad_w_hh, grad_bias,
// grad_w_hr.
template <class Products>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sequence_grads(
    const LayerParams& p, const FlatSequence& seq, const at::Tensor& dz, const at::Tensor& h_prev,
    const at::Tensor& dh_all, const at::Tensor& m_all) {
  return {Products::grad_input(dz, p.w_ih).view(p.input.sizes()), Products::weight(dz, seq.x),
          Products::weight(dz, h_prev), dz.sum(0),
          p.d.proj ? Products::weight(dh_all, m_all) : at::empty({0}, dz.options())};
}

}  // namespace fused_lstm

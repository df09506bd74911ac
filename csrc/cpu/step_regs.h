// The regularisers and resets as the CPU step loops read them.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "../layer_args.h"

namespace fused_lstm {
// Internal to lstm_cpu.cpp, the one file that includes this header: its definitions keep that
// file's internal linkage, so that the compiler sees the loops whole and inlines across headers.
namespace {

// A layer's regularisers and resets (meanings: fused_lstm/op_schemas.inc) as the step loops read
// them: raw pointers taken once per call, null where not given. The zoneout weights of row r (a row
// of the whole sequence) and unit j are at [r * ld + j]: a mask's element, or with ld = 0 a rate
// spread over one row, so that the loops read a rate and a mask alike. Without zoneout_cell, zc is
// a row of zeros (a rate of 0) for the backward, which always mixes when any is given.
// The mask and the resets are read where LayerParams holds them, contiguous; the zoneout weights
// from the copies in held.
template <typename T>
struct StepRegs {
  at::Tensor held[3];  // zeros, and the zoneout weights as rows
  const T *mask = nullptr, *zc = nullptr, *zh = nullptr, *zeros = nullptr;
  const bool* reset = nullptr;
  int64_t zc_ld = 0, zh_ld = 0;
  bool zoneout_cell = false;

  StepRegs(const Regularisers& r, const LayerDims& d, const at::TensorOptions& opts) {
    held[0] = at::zeros({d.H}, opts);
    zeros = held[0].const_data_ptr<T>();
    zc = zeros;
    if (r.recurrent_mask) mask = r.recurrent_mask->const_data_ptr<T>();
    zoneout_cell = r.zoneout_cell.has_value();
    if (zoneout_cell) zc = weights(*r.zoneout_cell, d.H, held[1], zc_ld);
    if (r.zoneout_hidden) zh = weights(*r.zoneout_hidden, d.Hr, held[2], zh_ld);
    if (r.reset) reset = r.reset->const_data_ptr<bool>();
  }

  static const T* weights(const at::Tensor& z, int64_t width, at::Tensor& held, int64_t& ld) {
    const bool rate = z.dim() == 0;
    held = rate ? z.expand({width}).contiguous() : z.reshape({-1, width}).contiguous();
    ld = rate ? 0 : width;
    return held.const_data_ptr<T>();
  }
};

// Zeroes rows b < bs of a (rows, width) state where flags[b] is set.
template <typename T>
void zero_reset_rows(const bool* flags, int64_t bs, T* state, int64_t width) {
  for (int64_t b = 0; b < bs; ++b) {
    if (flags[b]) std::fill_n(state + b * width, width, T(0));
  }
}

// Turns gather_h_prev's h_{t-1} into what entered the recurrent product (for dW_hh): zero at
// the reset rows, times recurrent_mask.
template <typename T>
void regularise_h_prev(const StepLayout& L, int64_t Hr, const StepRegs<T>& regs, T* h_prev) {
  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t start = L.start[s];
    if (regs.reset) zero_reset_rows(regs.reset + start, L.size[s], h_prev + start * Hr, Hr);
    if (!regs.mask) continue;
    T* hr = h_prev + start * Hr;
    for (int64_t k = 0; k < L.size[s] * Hr; ++k) hr[k] *= regs.mask[k];
  }
}

}  // namespace
}  // namespace fused_lstm

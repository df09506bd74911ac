// The interface between lstm_cuda.cu (checks, allocation, the GEMMs around the recurrence) and
// the step loops of step_loops.cuh (one kernel launch per step), which are compiled once per
// dtype and direction in instances/, so that nvcc builds them in parallel. The buffers are
// allocated by the caller and described here without their dtype.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "../layer_ops.h"
#include "../lstm_common.h"
#include "lstm_cuda_thread.h"

namespace fused_lstm {
namespace cuda_steps {

// The regularisers as contiguous tensors, alive for the launches that read them (StepRegs
// points into them); undefined where absent.
struct RegBuffers {
  at::Tensor recurrent_mask, zoneout_cell, zoneout_hidden, reset;
  bool any;  // Regularisers::any(): whether the kernels' kRegs instantiations run

  explicit RegBuffers(const Regularisers& r)
      : recurrent_mask(contiguous(r.recurrent_mask)), zoneout_cell(contiguous(r.zoneout_cell)),
        zoneout_hidden(contiguous(r.zoneout_hidden)), reset(contiguous(r.reset)), any(r.any()) {}

  template <typename T>
  cuda_work::StepRegs<T> view() const {
    cuda_work::StepRegs<T> v;
    v.recurrent_mask = recurrent_mask.defined() ? recurrent_mask.const_data_ptr<T>() : nullptr;
    v.reset = reset.defined() ? reset.const_data_ptr<bool>() : nullptr;
    v.zc = zoneout_weight<T>(zoneout_cell);
    v.zh = zoneout_weight<T>(zoneout_hidden);
    return v;
  }

 private:
  static at::Tensor contiguous(const std::optional<at::Tensor>& t) {
    return t ? t->contiguous() : at::Tensor();
  }
  // A 0-dim rate is read through strides 0 (ZoneoutWeight).
  template <typename T>
  static cuda_work::ZoneoutWeight<T> zoneout_weight(const at::Tensor& z) {
    if (!z.defined()) return {};
    const bool rate = z.dim() == 0;
    return {z.const_data_ptr<T>(), rate ? 0 : z.size(-1), rate ? 0 : 1};
  }
};

// The forward's buffers (shapes in lstm_cuda_thread.h); m and whr_t with projection only.
struct ForwardBuffers {
  const LayerDims& d;
  const StepLayout& L;
  const RegBuffers& regs;
  at::Tensor w_hh, h0, gates, cells, output, h_n, c_run, m, whr_t;
};

// The backward's; dy, ghn, dh_keep (zoneout_hidden) and the projection's dh_all, m_all, dm, whr
// may be undefined.
struct BackwardBuffers {
  const LayerDims& d;
  const StepLayout& L;
  const RegBuffers& regs;
  at::Tensor w_hh_t, dy, ghn, acts, cells, c0, y, h0, dz, dh_all, m_all, dm, whr, grad_h0,
      h_prev, dc_run, dh_keep;
};

// Runs the recurrence of one layer call on the current stream. Defined for double, float,
// c10::Half and c10::BFloat16 in instances/, as step_loops.cuh's forward_loop / backward_loop.
template <typename T>
void forward_steps(const ForwardBuffers& b);
template <typename T>
void backward_steps(const BackwardBuffers& b);
template <> void forward_steps<double>(const ForwardBuffers& b);
template <> void forward_steps<float>(const ForwardBuffers& b);
template <> void forward_steps<c10::Half>(const ForwardBuffers& b);
template <> void forward_steps<c10::BFloat16>(const ForwardBuffers& b);
template <> void backward_steps<double>(const BackwardBuffers& b);
template <> void backward_steps<float>(const BackwardBuffers& b);
template <> void backward_steps<c10::Half>(const BackwardBuffers& b);
template <> void backward_steps<c10::BFloat16>(const BackwardBuffers& b);

}  // namespace cuda_steps
}  // namespace fused_lstm

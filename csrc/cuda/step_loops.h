// The interface between lstm_cuda.cu (checks, allocation, the GEMMs around the recurrence) and
// the step loops of step_loops.cuh (one kernel launch per step), which are compiled once per
// dtype and direction in instances/, so that nvcc builds them in parallel. The buffers are
// allocated by the caller and described here without their dtype.
#pragma once

#include <ATen/ATen.h>

#include "../layer_args.h"

namespace fused_lstm {
namespace cuda_steps {

// The dtypes the step loops are compiled for: the one list that the declarations below and the
// emulated build's definitions are written from. Each needs instances/forward_NAME.cu and
// instances/backward_NAME.cu in the nvcc build; a missing one is an undefined symbol when
// fused_lstm loads the native library.
#define FL_CUDA_DTYPES(X) X(double) X(float) X(c10::Half) X(c10::BFloat16)

// The largest batch tiles (batch rows per block): the forward's 16 rows read W_hh once per step
// from B = 9 to 16. In double, and with the regularisers' extra loads, 16 rows' accumulators
// spill, so those take 8. The backward keeps 8, whose tiles of 4H are twice as wide (Tile's
// kStageValues), so that at B16 H768 a step stays at 3 trips to memory rather than 6.
template <typename acc_t>
constexpr int kForwardMaxBatchTile = sizeof(acc_t) > 4 ? 8 : 16;
constexpr int kMaxBatchTile = 8;

// The forward's buffers (shapes in lstm_cuda_thread.h); m and whr_t with projection only.
struct ForwardBuffers {
  const LayerParams& p;
  at::Tensor w_hh, h0, gates, cells, output, h_n, c_run, m, whr_t;
};

// The backward's; dy, ghn, dh_keep (zoneout_hidden) and the projection's dh_all, m_all, dm, whr
// may be undefined.
struct BackwardBuffers {
  const LayerBackwardParams& p;
  at::Tensor w_hh_t, dy, ghn, acts, cells, c0, y, h0, dz, dh_all, m_all, dm, whr, grad_h0, h_prev,
      dc_run, dh_keep;
};

// Runs the recurrence of one layer call on the current stream, as step_loops.cuh's
// forward_loop / backward_loop.
template <typename T>
void forward_steps(const ForwardBuffers& b);
template <typename T>
void backward_steps(const BackwardBuffers& b);

#define FL_DECLARE_STEPS(T)                       \
  template <>                                     \
  void forward_steps<T>(const ForwardBuffers& b); \
  template <>                                     \
  void backward_steps<T>(const BackwardBuffers& b);
FL_CUDA_DTYPES(FL_DECLARE_STEPS)
#undef FL_DECLARE_STEPS

}  // namespace cuda_steps
}  // namespace fused_lstm

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
// spill, so those take 8. The backward keeps 8, which leaves its tiles of 4H wide (Tile's
// kStageRegs) and lets two blocks share an SM (kBackwardBlocksPerSM), one wave at B16 H768.
template <typename acc_t>
constexpr int kForwardMaxBatchTile = sizeof(acc_t) > 4 ? 8 : 16;
constexpr int kMaxBatchTile = 8;

// The length of a row that the step kernels read in 16-byte vectors: n elements of `dtype`
// rounded up to a whole vector (lstm_cuda_thread.h's ld and ldg).
inline int64_t vector_stride(int64_t n, at::ScalarType dtype) {
  const int64_t v = 16 / static_cast<int64_t>(at::elementSize(dtype));
  return (n + v - 1) / v * v;
}

// t (rows, n) as the step kernels read it: rows of vector_stride(n) from a 16-byte aligned
// start, zeros past n. t itself, made contiguous, where that is already so; else a padded copy.
inline at::Tensor vector_rows(const at::Tensor& t) {
  const int64_t n = t.size(1), ld = vector_stride(n, t.scalar_type());
  if (ld == n) {
    at::Tensor c = t.contiguous();
    return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
  }
  at::Tensor out = at::empty({t.size(0), ld}, t.options());
  out.narrow(1, 0, n).copy_(t);
  out.narrow(1, n, ld - n).zero_();
  return out;
}

// A new (rows, n) buffer of vector_rows' layout, for the kernels to write; its rows' padding is
// zero, since the kernels read it with the rows.
inline at::Tensor vector_buffer(int64_t rows, int64_t n, const at::TensorOptions& opts) {
  const int64_t ld = vector_stride(n, opts.dtype().toScalarType());
  at::Tensor out = at::empty({rows, ld}, opts);
  if (ld > n) out.narrow(1, n, ld - n).zero_();
  return out;
}

// The forward's buffers (shapes in lstm_cuda_thread.h), in vector_rows' layout where the step
// kernels read them in vectors: w_hh, h0, output and recurrent_mask (undefined without one); m
// and whr_t with projection only.
struct ForwardBuffers {
  const LayerParams& p;
  at::Tensor w_hh, h0, gates, cells, output, h_n, c_run, m, whr_t, recurrent_mask;
};

// The backward's, w_hh_t and dz in vector_rows' layout; dy, ghn, dh_keep (zoneout_hidden) and
// the projection's dh_all, m_all, dm, whr may be undefined.
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

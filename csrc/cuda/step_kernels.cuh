// The CUDA kernels of one step, forward and backward, and their parameter structs: what each
// block and lane computes. lstm_cuda.cu launches them step by step; the per-thread arithmetic
// they call is lstm_cuda_thread.h's. Included by lstm_cuda.cu only (and with it by the
// emulated build), so its definitions share that file's internal linkage.
#pragma once

#include <cstdint>

#include "../lstm_gates.h"
#include "gpu_runtime.h"
#include "lstm_cuda_thread.h"

namespace fused_lstm {
namespace {

using namespace cuda_work;

// ---- device-only pieces: warp reductions and shared-memory staging -------------------------

template <int NG, int BT, typename acc_t>
__device__ __forceinline__ void warp_allreduce(acc_t (&acc)[NG][BT]) {
#pragma unroll
  for (int g = 0; g < NG; ++g) {
#pragma unroll
    for (int r = 0; r < BT; ++r) {
#pragma unroll
      for (int off = kWarpSize / 2; off > 0; off >>= 1) {
        acc[g][r] += __shfl_xor_sync(0xffffffffu, acc[g][r], off);
      }
    }
  }
}

// acc[r] with a runtime r, without spilling the array to local memory.
template <int BT, typename acc_t>
__device__ __forceinline__ acc_t pick(const acc_t (&a)[BT], int r) {
  acc_t v = a[0];
#pragma unroll
  for (int i = 1; i < BT; ++i) v = i == r ? a[i] : v;
  return v;
}

// ---- forward step ---------------------------------------------------------------------------

template <typename T, typename acc_t>
struct ForwardStep {
  const T* w_hh;  // (4H, Hr)
  const T* h0;    // (B, Hr)
  T* gates;       // (rows, 4H)
  T* cells;       // (rows, H)
  T* out;         // (rows, Hr): h_{t-1} is read from the previous step's rows
  T* m;           // (B, H) with projection, else nullptr
  T* h_n;         // (B, Hr), written without projection
  acc_t* c_run;   // (B, H)
  StepRegs<T> regs;
  int64_t H, Hr, start, bs, prev_start, prev_size;
};

// grid (ceil(H / kWarps), ceil(bs / BT)), block kThreads. Warp w of block (x, y) owns hidden
// unit j = x * kWarps + w (rows j, H+j, 2H+j, 3H+j of W_hh) for batch rows [y*BT, y*BT + BT);
// the block stages those rows of h_{t-1} in shared memory, kChunk columns at a time, and each
// lane accumulates every kWarpSize-th column. Lane r then applies the gate math for row y*BT+r.
// kRegs: the staged h_{t-1} is the entering state times recurrent_mask (see forward_unit).
template <typename T, typename acc_t, int BT, bool kRegs>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(const ForwardStep<T, acc_t> p) {
  FL_SHARED_ARRAY(acc_t, sx, BT * kChunk);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * BT;
  acc_t acc[4][BT];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
#pragma unroll
    for (int r = 0; r < BT; ++r) acc[g][r] = acc_t(0);
  }
  for (int64_t k0 = 0; k0 < p.Hr; k0 += kChunk) {
    const int kc = static_cast<int>(p.Hr - k0 < kChunk ? p.Hr - k0 : kChunk);
    __syncthreads();  // every warp is done with the previous tile
    for (int i = threadIdx.x; i < BT * kChunk; i += kThreads) {
      const int r = i / kChunk, k = i % kChunk;
      const int64_t b = b0 + r;
      if (!(b < p.bs && k < kc)) {
        sx[i] = acc_t(0);
      } else if constexpr (kRegs) {
        sx[i] = recurrent_h<T, acc_t>(p.regs, p.start + b, b, k0 + k, p.Hr, p.prev_start,
                                      p.prev_size, p.out, p.h0);
      } else {
        sx[i] = load_h_prev<T, acc_t>(b, k0 + k, p.Hr, p.prev_start, p.prev_size, p.out, p.h0);
      }
    }
    __syncthreads();
    if (j < p.H) lane_dot<4, BT>(p.w_hh + j * p.Hr + k0, p.H * p.Hr, sx, kChunk, kc, lane,
                                 kWarpSize, acc);
  }
  warp_allreduce<4, BT>(acc);
  const int64_t b = b0 + lane;
  if (j < p.H && lane < BT && b < p.bs) {
    const acc_t rec[4] = {pick<BT>(acc[0], lane), pick<BT>(acc[1], lane),
                          pick<BT>(acc[2], lane), pick<BT>(acc[3], lane)};
    const acc_t h_prev = kRegs && p.m == nullptr && p.regs.zh.on()
                             ? entering_h<T, acc_t>(p.regs, p.start + b, b, j, p.Hr, p.prev_start,
                                                    p.prev_size, p.out, p.h0)
                             : acc_t(0);
    forward_unit<T, acc_t, kRegs>(p.start + b, b, j, p.H, rec, p.gates, p.cells, p.c_run, p.m,
                                  p.out, p.h_n, p.regs, h_prev);
  }
}

// Projection with zoneout_hidden only: h_t = mix(d, h_{t-1}, y) over this step's rows of out,
// one thread per (b, k), after the host's y = m W_hr^T. It reads the previous step's rows, which
// no thread of this launch writes.
template <typename T, typename acc_t>
__global__ void __launch_bounds__(kThreads) zoneout_hidden_kernel(const ForwardStep<T, acc_t> p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.bs * p.Hr) return;
  const int64_t b = i / p.Hr, k = i - b * p.Hr, row = p.start + b;
  const acc_t h_prev = entering_h<T, acc_t>(p.regs, row, b, k, p.Hr, p.prev_start, p.prev_size,
                                            p.out, p.h0);
  T& y = p.out[row * p.Hr + k];
  y = static_cast<T>(zoneout_mix(p.regs.zh.template at<acc_t>(row, k), h_prev,
                                 static_cast<acc_t>(y)));
}

// ---- backward step --------------------------------------------------------------------------

template <typename T, typename acc_t>
struct BackwardStep {
  const T* w_hh_t;  // (Hr, 4H)
  const T* dy;      // (rows, Hr) or nullptr
  const T* ghn;     // (B, Hr) or nullptr
  const T* acts;    // (rows, 4H)
  const T* cells;   // (rows, H)
  const T* c0;      // (B, H)
  const T* dm;      // (B, H) with projection: dh_t W_hr of this step
  T* dz;            // (rows, 4H): rows of the next visited step read, this step's written
  T* dh_all;        // (rows, Hr) with projection
  T* m_all;         // (rows, H) with projection
  T* grad_h0;       // (B, Hr)
  acc_t* dc_run;    // (B, H)
  acc_t* dh_keep;   // (B, Hr) with zoneout_hidden
  StepRegs<T> regs;
  int64_t H, Hr, start, bs, next_start, next_size, prev_start, prev_size;
};

// grid (ceil(Hr / kWarps), ceil(max(bs, next_size) / BT)), block kThreads. Warp w owns column
// u = x * kWarps + w of dh (row u of W_hh^T) for batch rows [y*BT, y*BT + BT); the block stages
// those rows of the next visited step's dz. Lane r then finishes row b = y*BT + r:
//   b < bs:              dh_t = dot + dy + grad_h_n (step_dh); kFuseUnit: the gate backward of
//                        unit u (Hr == H), else dh_all for the host's dm = dh W_hr
//   bs <= b < next_size: the next step was b's first visited one, so dot is grad_h0[b].
// The call after the loop (bs = 0, next = the first visited step) produces the rest of grad_h0.
// kRegs: dot becomes carried_dh (recurrent mask, zoneout_hidden's kept part, resets), and dh_t
// is split by zoneout_hidden (split_dh) before the gate backward or dh_all.
template <typename T, typename acc_t, int BT, bool kFuseUnit, bool kRegs>
__global__ void __launch_bounds__(kThreads) backward_step_kernel(const BackwardStep<T, acc_t> p) {
  FL_SHARED_ARRAY(acc_t, sx, BT * kChunk);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * BT;
  const int64_t G = 4 * p.H;
  acc_t acc[1][BT];
#pragma unroll
  for (int r = 0; r < BT; ++r) acc[0][r] = acc_t(0);
  if (b0 < p.next_size) {  // uniform over the block, so the barriers below stay uniform
    for (int64_t k0 = 0; k0 < G; k0 += kChunk) {
      const int kc = static_cast<int>(G - k0 < kChunk ? G - k0 : kChunk);
      __syncthreads();
      for (int i = threadIdx.x; i < BT * kChunk; i += kThreads) {
        const int r = i / kChunk, k = i % kChunk;
        const int64_t b = b0 + r;
        sx[i] = (b < p.next_size && k < kc)
                    ? static_cast<acc_t>(p.dz[(p.next_start + b) * G + k0 + k])
                    : acc_t(0);
      }
      __syncthreads();
      if (u < p.Hr) lane_dot<1, BT>(p.w_hh_t + u * G + k0, 0, sx, kChunk, kc, lane, kWarpSize,
                                    acc);
    }
  }
  warp_allreduce<1, BT>(acc);
  const int64_t b = b0 + lane;
  if (u >= p.Hr || lane >= BT) return;
  acc_t dot = pick<BT>(acc[0], lane);
  if constexpr (kRegs) {
    if (b < p.next_size) dot = carried_dh(p.regs, dot, p.next_start + b, b, u, p.Hr, p.dh_keep);
  }
  if (b < p.bs) {
    const int64_t row = p.start + b;
    acc_t dh = step_dh<T, acc_t>(dot, row, b, u, p.Hr, p.next_size, p.dy, p.ghn);
    if constexpr (kRegs) dh = split_dh(p.regs, dh, row, b, u, p.Hr, p.dh_keep);
    if constexpr (kFuseUnit) {
      backward_unit<T, acc_t, kRegs>(row, prev_row(b, p.prev_start, p.prev_size), b, u, p.H, dh,
                                     p.acts, p.cells, p.c0, p.dc_run, p.dz, nullptr, p.regs);
    } else {
      p.dh_all[row * p.Hr + u] = static_cast<T>(dh);
    }
  } else if (b < p.next_size) {
    p.grad_h0[b * p.Hr + u] = static_cast<T>(dot);
  }
}

// Projection only: the gate backward of this step, one thread per (b, j), from dm = dh W_hr.
template <typename T, typename acc_t, bool kRegs>
__global__ void __launch_bounds__(kThreads) backward_unit_kernel(const BackwardStep<T, acc_t> p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.bs * p.H) return;
  const int64_t b = i / p.H, j = i - b * p.H;
  backward_unit<T, acc_t, kRegs>(p.start + b, prev_row(b, p.prev_start, p.prev_size), b, j, p.H,
                                 static_cast<acc_t>(p.dm[b * p.H + j]), p.acts, p.cells, p.c0,
                                 p.dc_run, p.dz, p.m_all, p.regs);
}

// out (n, width) = rows of a or b chosen by src (gather_offset).
template <typename T>
__global__ void __launch_bounds__(kThreads) gather_rows_kernel(const T* a, const T* b,
                                                               const int64_t* src, int64_t n,
                                                               int64_t width, T* out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n * width;
       i += stride) {
    bool from_a;
    const int64_t off = gather_offset(i, width, src, &from_a);
    out[i] = from_a ? a[off] : b[off];
  }
}

}  // namespace
}  // namespace fused_lstm

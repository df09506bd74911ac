// The step loops of the CUDA backend: one launch of a step kernel (step_kernels.cuh) per step of
// the layout, on the current stream, and with a projection the ATen products between them.
// Included by the files of instances/, each of which defines forward_steps or backward_steps
// (step_loops.h) for one dtype as a call of forward_loop or backward_loop. Everything here has
// internal linkage, so that each kernel is compiled in the one file that launches it.
//
// Capturable in a CUDA graph: everything a launch needs is in its parameter struct, taken by
// value at launch (and at capture), so nothing is allocated on or copied from the host per call.
// Consecutive step kernels are chained (gpu::launch_chained) where the device allows, so a
// step's first weight loads overlap the tail of the step before; the first step of a call is
// not, since the kernel before it may write the weights it reads first.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <type_traits>

#include "gpu_runtime.h"
#include "step_kernels.cuh"
#include "step_loops.h"

namespace fused_lstm {
namespace cuda_steps {
namespace {

using namespace cuda_work;

unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

// Batch rows per block, a compile-time constant so the accumulators stay in registers: small
// batches waste no lanes on empty rows, larger ones reuse each weight load for up to kMaxBT
// rows: f(bt).
template <int kMaxBT, typename F>
void with_batch_tile(int64_t B, const F& f) {
  if (B <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (B <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (B <= 4) {
    f(std::integral_constant<int, 4>{});
  } else if constexpr (kMaxBT >= 16) {
    if (B <= 8) {
      f(std::integral_constant<int, 8>{});
    } else {
      f(std::integral_constant<int, 16>{});
    }
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// with_batch_tile, and the kernels' kRegs (whether any regulariser or reset is given) as a
// compile-time constant too, so that a call without any runs kernels with none of their loads
// or branches: f(bt, regs_on). The kRegs kernels take batch tiles up to kMaxBTRegs.
template <int kMaxBT, int kMaxBTRegs, typename F>
void with_tile_and_regs(int64_t B, bool any, const F& f) {
  if (any) {
    with_batch_tile<kMaxBTRegs>(B, [&](auto bt) { f(bt, std::true_type{}); });
  } else {
    with_batch_tile<kMaxBT>(B, [&](auto bt) { f(bt, std::false_type{}); });
  }
}

template <typename T>
void forward_loop(const ForwardBuffers& bufs) {
  using acc_t = at::opmath_type<T>;
  const LayerDims& d = bufs.p.d;
  const StepLayout& L = bufs.p.steps;
  const int64_t S = static_cast<int64_t>(L.start.size());
  // The step's rows (start, bs, prev_start, prev_size) are set per launch below.
  ForwardStep<T, acc_t> p{.w_hh = bufs.w_hh.const_data_ptr<T>(),
                          .h0 = bufs.h0.const_data_ptr<T>(),
                          .gates = bufs.gates.data_ptr<T>(),
                          .cells = bufs.cells.data_ptr<T>(),
                          .out = bufs.output.data_ptr<T>(),
                          .m = d.proj ? bufs.m.data_ptr<T>() : nullptr,
                          .h_n = bufs.h_n.data_ptr<T>(),
                          .c_run = bufs.c_run.data_ptr<acc_t>(),
                          .regs = step_regs<T>(bufs.p.regs),
                          .H = d.H,
                          .Hr = d.Hr,
                          .ld = bufs.output.stride(0)};
  p.regs.recurrent_mask =
      bufs.recurrent_mask.defined() ? bufs.recurrent_mask.const_data_ptr<T>() : nullptr;
  // With a projection, batch row b's h_n is its y at its last visited step: rows
  // [later[s], size[s]) end at step s, where later[s] is the largest batch of the steps after s.
  std::vector<int64_t> later(d.proj ? static_cast<size_t>(S) : 0, 0);
  for (int64_t s = static_cast<int64_t>(later.size()) - 2; s >= 0; --s) {
    later[s] = std::max(later[s + 1], L.size[s + 1]);
  }
  const bool chain = !d.proj && gpu::can_chain_launches();
  const gpu::Stream stream = gpu::current_stream();
  constexpr int kMaxBT = kForwardMaxBatchTile<acc_t>;
  with_tile_and_regs<kMaxBT, kMaxBatchTile>(d.B, bufs.p.regs.any(), [&](auto bt, auto regs_on) {
    constexpr int BT = decltype(bt)::value;
    constexpr bool kRegs = decltype(regs_on)::value;
    for (int64_t s = 0; s < S; ++s) {
      p.start = L.start[s];
      p.bs = L.size[s];
      p.prev_start = s > 0 ? L.start[s - 1] : 0;
      p.prev_size = s > 0 ? L.size[s - 1] : 0;
      if (p.bs == 0) continue;  // batch size 0: a launch with an empty grid is an error
      const dim3 grid(blocks_for(d.H, kWarps), blocks_for(p.bs, BT));
      FL_LAUNCH_CHAINED(chain && s > 0, (forward_step_kernel<T, acc_t, BT, kRegs>), grid, kThreads,
                        0, stream, p);
      if (d.proj) {
        // Extra launches per step: y = m W_hr^T needs all of m (docs/cuda.md#projection).
        at::Tensor y = bufs.output.narrow(0, p.start, p.bs).narrow(1, 0, d.Hr);
        at::mm_out(y, bufs.m.narrow(0, 0, p.bs), bufs.whr_t);
        // And zoneout_hidden's mix needs all of y.
        if (p.regs.zh.on()) {
          FL_LAUNCH((zoneout_hidden_kernel<T, acc_t>), blocks_for(p.bs * d.Hr, kThreads), kThreads,
                    0, stream, p);
        }
        if (later[s] < p.bs) {
          const int64_t n = p.bs - later[s];
          bufs.h_n.narrow(0, later[s], n).copy_(y.narrow(0, later[s], n));
        }
      }
    }
  });
}

template <typename T>
void backward_loop(const BackwardBuffers& bufs) {
  using acc_t = at::opmath_type<T>;
  const LayerDims& d = bufs.p.d;
  const StepLayout& L = bufs.p.steps;
  const int64_t S = static_cast<int64_t>(L.start.size());
  const auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  const auto ptr_acc = [](const at::Tensor& t) {
    return t.defined() ? t.data_ptr<acc_t>() : nullptr;
  };
  // The step's rows (start, bs and its neighbours') are set per launch below.
  BackwardStep<T, acc_t> p{.w_hh_t = bufs.w_hh_t.const_data_ptr<T>(),
                           .dy = ptr(bufs.dy),
                           .ghn = ptr(bufs.ghn),
                           .acts = bufs.acts.const_data_ptr<T>(),
                           .cells = bufs.cells.const_data_ptr<T>(),
                           .c0 = bufs.c0.const_data_ptr<T>(),
                           .dm = ptr(bufs.dm),
                           .dz = bufs.dz.data_ptr<T>(),
                           .dh_all = ptr(bufs.dh_all),
                           .m_all = ptr(bufs.m_all),
                           .grad_h0 = bufs.grad_h0.data_ptr<T>(),
                           .y = bufs.y.const_data_ptr<T>(),
                           .h0 = bufs.h0.const_data_ptr<T>(),
                           .h_prev = bufs.h_prev.data_ptr<T>(),
                           .dc_run = bufs.dc_run.data_ptr<acc_t>(),
                           .dh_keep = ptr_acc(bufs.dh_keep),
                           .regs = step_regs<T>(bufs.p.regs),
                           .H = d.H,
                           .Hr = d.Hr,
                           .ldg = bufs.dz.stride(0)};
  const bool chain = !d.proj && gpu::can_chain_launches();
  const gpu::Stream stream = gpu::current_stream();
  constexpr int kMaxBT = kMaxBatchTile;
  with_tile_and_regs<kMaxBT, kMaxBT>(d.B, bufs.p.regs.any(), [&](auto bt, auto regs_on) {
    constexpr int BT = decltype(bt)::value;
    constexpr bool kRegs = decltype(regs_on)::value;
    bool first = true;
    const auto launch_step = [&]() {
      if (std::max(p.bs, p.next_size) == 0) return;  // batch size 0: nothing to launch
      const dim3 grid(blocks_for(d.Hr, kWarps), blocks_for(std::max(p.bs, p.next_size), BT));
      if (d.proj) {
        FL_LAUNCH((backward_step_kernel<T, acc_t, BT, false, kRegs>), grid, kThreads, 0, stream, p);
      } else {
        FL_LAUNCH_CHAINED(chain && !first, (backward_step_kernel<T, acc_t, BT, true, kRegs>), grid,
                          kThreads, 0, stream, p);
      }
      first = false;
    };
    for (int64_t s = S - 1; s >= 0; --s) {
      p.start = L.start[s];
      p.bs = L.size[s];
      p.next_start = s + 1 < S ? L.start[s + 1] : 0;
      p.next_size = s + 1 < S ? L.size[s + 1] : 0;
      p.prev_start = s > 0 ? L.start[s - 1] : 0;
      p.prev_size = s > 0 ? L.size[s - 1] : 0;
      launch_step();
      if (d.proj) {
        // Extra launches per step: dm = dh W_hr needs all of dh_t (docs/cuda.md#projection).
        if (p.bs == 0) continue;
        at::Tensor dm_rows = bufs.dm.narrow(0, 0, p.bs);
        at::mm_out(dm_rows, bufs.dh_all.narrow(0, p.start, p.bs), bufs.whr);
        FL_LAUNCH((backward_unit_kernel<T, acc_t, kRegs>), blocks_for(p.bs * d.H, kThreads),
                  kThreads, 0, stream, p);
      }
    }
    if (S > 0) {
      // dL/dh0 of the rows the first visited step holds: its dz times W_hh, no gate math.
      p.start = 0;
      p.bs = 0;
      p.next_start = L.start[0];
      p.next_size = L.size[0];
      p.prev_start = p.prev_size = 0;
      launch_step();
    }
  });
}

}  // namespace
}  // namespace cuda_steps
}  // namespace fused_lstm

// The definitions of forward_steps<T> and backward_steps<T> (step_loops.h): one a file in
// instances/, all of FL_CUDA_DTYPES in the emulated build.
#define FL_FORWARD_STEPS(T)                                                \
  template <>                                                              \
  void fused_lstm::cuda_steps::forward_steps<T>(const ForwardBuffers& b) { \
    forward_loop<T>(b);                                                    \
  }
#define FL_BACKWARD_STEPS(T)                                                 \
  template <>                                                                \
  void fused_lstm::cuda_steps::backward_steps<T>(const BackwardBuffers& b) { \
    backward_loop<T>(b);                                                     \
  }

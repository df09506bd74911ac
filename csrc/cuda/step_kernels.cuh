// The CUDA kernels of one step, forward and backward, and their parameter structs: what each
// block and lane computes. step_loops.cuh launches them step by step; the per-thread arithmetic
// they call is lstm_cuda_thread.h's. Their definitions have internal linkage, one copy per
// translation unit that launches them.
//
// A step's time is mostly memory latency, so each kernel issues its loads together and waits on
// them once per tile of the reduction (docs/cuda.md#memory-reads):
//   1. the warp's weight rows for the tile, 16-byte loads, into registers (WeightTile); before
//      the first tile they do not depend on the previous step, so they are issued before
//      FL_WAIT_PRIOR_GRIDS, overlapping the previous launch's tail where launches are chained;
//   2. the block's batch rows of the operand (h_{t-1}, or the next visited step's dz), every
//      load issued before any store to shared memory, then one barrier;
//   3. the dot products, from registers and 16-byte shared-memory reads.
// Tiles are as wide as the shared-memory and register budgets allow (Tile): at B16 H768 in
// bfloat16 a forward step has 3 tiles, a backward step 3.
#pragma once

#include <cstdint>

#include "../lstm_gates.h"
#include "gpu_runtime.h"
#include "lstm_cuda_thread.h"

namespace fused_lstm {
namespace {

using namespace cuda_work;
using gpu::Vec;

// A tile's budget, set so that no kernel spills (ptxas -v, benchmarks/cuda_resources.py): the
// staged rows take at most kStageBytes of shared memory; a thread holds at most kStageValues of
// them in registers between its loads and its stores (16 in the forward, whose accumulators take
// four times the registers, 32 in the backward); a lane's weights, converted to the
// accumulation type, take at most kWeightRegs registers, which is also what bounds the 16-byte
// loads it has in flight.
constexpr int kStageBytes = 32 * 1024;
constexpr int kWeightRegs = 32;

constexpr int min_int(int a, int b) { return a < b ? a : b; }

// The shape of a tile for storage type T, accumulation type acc_t, BT batch rows and NG weight
// rows per warp: every lane reads kUnroll vectors of kVec columns from each row, and the tile is
// the kCols columns the whole warp reads.
template <typename T, typename acc_t, int BT, int NG>
struct Tile {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLaneSpan = kWarpSize * kVec;
  static constexpr int kStageValues = NG == 1 ? 32 : 16;
  static constexpr int kUnroll =
      min_int(min_int(kWeightRegs * 4 / (NG * kVec * static_cast<int>(sizeof(acc_t))),
                      kStageValues* kThreads / BT / kLaneSpan),
              kStageBytes / (BT * static_cast<int>(sizeof(acc_t))) / kLaneSpan);
  static constexpr int kCols = kUnroll * kLaneSpan;
  static constexpr int kStagePerThread = (BT * kCols + kThreads - 1) / kThreads;
  static_assert(kUnroll >= 1, "a lane reads at least one vector of each row");
};

// ---- device-only pieces: weight tiles, staging, dot products, warp reductions ---------------

// A lane's share of NG weight rows (w + g * stride, g < NG, each n long) over the tile at k0:
// vector u holds columns k0 + (u * kWarpSize + lane) * kVec, .. + kVec, zero past n. `vec`: every
// row start is 16-byte aligned and n a multiple of kVec, so whole vectors are single loads.
template <typename T, int NG, int kUnroll>
struct WeightTile {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  Vec<T, kVec> v[NG][kUnroll];

  __device__ __forceinline__ void load(const T* w, int64_t stride, int64_t n, int64_t k0, int lane,
                                       bool vec, bool row_ok) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u * kWarpSize + lane) * kVec;
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        const T* src = w + g * stride + k;
        if (row_ok && vec && k < n) {
          v[g][u] = FL_LOAD_VEC(reinterpret_cast<const Vec<T, kVec>*>(src));
        } else {
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            v[g][u].v[e] = row_ok && k + e < n ? src[e] : static_cast<T>(0.0f);
          }
        }
      }
    }
  }
};

// Stages BT rows of the tile at k0 into sx (BT x kCols, acc_t): load(b, k) is element k of batch
// row b (b < rows, k < n); zeros elsewhere up to the last vector the dot products read. Every
// thread issues all of its loads before any store, then one barrier; `reuse` adds the barrier
// that lets every warp finish reading the previous tile first.
template <typename Sh, int BT, typename acc_t, typename Load>
__device__ __forceinline__ void stage_tile(acc_t* sx, int64_t b0, int64_t rows, int64_t k0,
                                           int64_t n, bool reuse, const Load& load) {
  const int64_t kc = n - k0 < Sh::kCols ? n - k0 : Sh::kCols;
  const int64_t read = (kc + Sh::kVec - 1) / Sh::kVec * Sh::kVec;
  acc_t v[Sh::kStagePerThread];
#pragma unroll
  for (int i = 0; i < Sh::kStagePerThread; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    const int r = e / Sh::kCols, k = e % Sh::kCols;
    v[i] = r < BT && b0 + r < rows && k < kc ? load(b0 + r, k0 + k) : acc_t(0);
  }
  if (reuse) __syncthreads();
#pragma unroll
  for (int i = 0; i < Sh::kStagePerThread; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    if (e < BT * Sh::kCols && e % Sh::kCols < read) sx[e] = v[i];
  }
  __syncthreads();
}

// acc[g][r] += the lane's share of w row g times staged row r over the tile (kc columns from
// the tile's start are real; vectors past them are skipped).
template <typename Sh, int NG, int BT, typename T, typename acc_t>
__device__ __forceinline__ void dot_tile(const WeightTile<T, NG, Sh::kUnroll>& w, const acc_t* sx,
                                         int64_t kc, int lane, acc_t (&acc)[NG][BT]) {
  constexpr int kX = min_int(Sh::kVec, 16 / static_cast<int>(sizeof(acc_t)));
#pragma unroll
  for (int u = 0; u < Sh::kUnroll; ++u) {
    const int k = (u * kWarpSize + lane) * Sh::kVec;
    if (k >= kc) continue;
#pragma unroll
    for (int r = 0; r < BT; ++r) {
#pragma unroll
      for (int e0 = 0; e0 < Sh::kVec; e0 += kX) {
        const Vec<acc_t, kX> x =
            FL_LOAD_VEC(reinterpret_cast<const Vec<acc_t, kX>*>(sx + r * Sh::kCols + k + e0));
#pragma unroll
        for (int g = 0; g < NG; ++g) {
#pragma unroll
          for (int e = 0; e < kX; ++e) {
            acc[g][r] += static_cast<acc_t>(w.v[g][u].v[e0 + e]) * x.v[e];
          }
        }
      }
    }
  }
}

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
  bool w_vec;  // w_hh's rows can be read in 16-byte vectors (WeightTile)
};

// grid (ceil(H / kWarps), ceil(bs / BT)), block kThreads. Warp w of block (x, y) owns hidden
// unit j = x * kWarps + w (rows j, H+j, 2H+j, 3H+j of W_hh) for batch rows [y*BT, y*BT + BT);
// the block stages those rows of h_{t-1} in shared memory a tile at a time, and the lanes split
// each tile's columns (WeightTile). Lane r then applies the gate math for row y*BT+r; its inputs
// (this step's x W_ih^T + b, c_{t-1}) are loaded with the first tile, not after the reduction.
// kRegs: the staged h_{t-1} is the entering state times recurrent_mask (see forward_unit).
template <typename T, typename acc_t, int BT, bool kRegs>
__global__ void __launch_bounds__(kThreads) forward_step_kernel(const ForwardStep<T, acc_t> p) {
  using Sh = Tile<T, acc_t, BT, 4>;
  FL_SHARED_ARRAY(acc_t, sx, BT * Sh::kCols);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * BT;
  const bool unit = j < p.H;
  const T* w_rows = p.w_hh + (unit ? j : 0) * p.Hr;
  WeightTile<T, 4, Sh::kUnroll> w;
  w.load(w_rows, p.H * p.Hr, p.Hr, 0, lane, p.w_vec, unit);
  FL_WAIT_PRIOR_GRIDS();
  FL_RELEASE_DEPENDENTS();

  const int64_t b = b0 + lane;
  const bool finisher = unit && lane < BT && b < p.bs;
  const int64_t row = p.start + b;
  acc_t z[4] = {}, c_prev = acc_t(0), h_prev = acc_t(0);
  if (finisher) {
    const T* zr = p.gates + row * 4 * p.H;
#pragma unroll
    for (int g = 0; g < 4; ++g) z[g] = static_cast<acc_t>(zr[g * p.H + j]);
    c_prev = p.c_run[b * p.H + j];
    if (kRegs && p.m == nullptr && p.regs.zh.on()) {
      h_prev =
          entering_h<T, acc_t>(p.regs, row, b, j, p.Hr, p.prev_start, p.prev_size, p.out, p.h0);
    }
  }

  acc_t acc[4][BT];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
#pragma unroll
    for (int r = 0; r < BT; ++r) acc[g][r] = acc_t(0);
  }
  const auto h_entering = [&](int64_t bb, int64_t k) {
    if constexpr (kRegs) {
      return recurrent_h<T, acc_t>(p.regs, p.start + bb, bb, k, p.Hr, p.prev_start, p.prev_size,
                                   p.out, p.h0);
    } else {
      return load_h_prev<T, acc_t>(bb, k, p.Hr, p.prev_start, p.prev_size, p.out, p.h0);
    }
  };
  for (int64_t k0 = 0;;) {
    stage_tile<Sh, BT>(sx, b0, p.bs, k0, p.Hr, k0 > 0, h_entering);
    if (unit) dot_tile<Sh>(w, sx, p.Hr - k0, lane, acc);
    k0 += Sh::kCols;
    if (k0 >= p.Hr) break;
    w.load(w_rows, p.H * p.Hr, p.Hr, k0, lane, p.w_vec, unit);
  }
  warp_allreduce<4, BT>(acc);
  if (finisher) {
#pragma unroll
    for (int g = 0; g < 4; ++g) z[g] += pick<BT>(acc[g], lane);
    forward_unit<T, acc_t, kRegs>(row, b, j, p.H, z, c_prev, p.gates, p.cells, p.c_run, p.m, p.out,
                                  p.h_n, p.regs, h_prev);
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
  const acc_t h_prev =
      entering_h<T, acc_t>(p.regs, row, b, k, p.Hr, p.prev_start, p.prev_size, p.out, p.h0);
  T& y = p.out[row * p.Hr + k];
  y = static_cast<T>(
      zoneout_mix(p.regs.zh.template at<acc_t>(row, k), h_prev, static_cast<acc_t>(y)));
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
  const T* y;       // (rows, Hr): the forward's output, h_{t-1} of the following steps
  const T* h0;      // (B, Hr)
  T* h_prev;        // (rows, Hr): what entered this step's recurrent product, for dW_hh
  acc_t* dc_run;    // (B, H)
  acc_t* dh_keep;   // (B, Hr) with zoneout_hidden
  StepRegs<T> regs;
  int64_t H, Hr, start, bs, next_start, next_size, prev_start, prev_size;
  bool w_vec;  // w_hh_t's rows can be read in 16-byte vectors (WeightTile)
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
  using Sh = Tile<T, acc_t, BT, 1>;
  FL_SHARED_ARRAY(acc_t, sx, BT * Sh::kCols);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * BT;
  const int64_t G = 4 * p.H;
  const bool column = u < p.Hr;
  const T* w_row = p.w_hh_t + (column ? u : 0) * G;
  WeightTile<T, 1, Sh::kUnroll> w;
  w.load(w_row, 0, G, 0, lane, p.w_vec, column);
  // The epilogue's inputs of lane r (row b = b0 + r), loaded before the reduction: h_{t-1} for
  // dW_hh (the forward's output, not written here), and the unit's saved state.
  const int64_t b = b0 + lane;
  const bool finisher = column && lane < BT && b < p.bs;
  const int64_t row = p.start + b, prow = prev_row(b, p.prev_start, p.prev_size);
  acc_t h_prev = acc_t(0);
  if (finisher) {
    if constexpr (kRegs) {
      h_prev = recurrent_h<T, acc_t>(p.regs, row, b, u, p.Hr, p.prev_start, p.prev_size, p.y, p.h0);
    } else {
      h_prev = load_h_prev<T, acc_t>(b, u, p.Hr, p.prev_start, p.prev_size, p.y, p.h0);
    }
  }
  FL_WAIT_PRIOR_GRIDS();
  FL_RELEASE_DEPENDENTS();
  UnitSaved<acc_t> saved{};
  if (kFuseUnit && finisher) {
    saved = load_unit<T, acc_t>(row, prow, b, u, p.H, p.acts, p.cells, p.c0, p.dc_run);
  }
  acc_t acc[1][BT];
#pragma unroll
  for (int r = 0; r < BT; ++r) acc[0][r] = acc_t(0);
  if (b0 < p.next_size) {  // uniform over the block, so the barriers below stay uniform
    const auto dz_next = [&](int64_t bb, int64_t k) {
      return static_cast<acc_t>(p.dz[(p.next_start + bb) * G + k]);
    };
    for (int64_t k0 = 0;;) {
      stage_tile<Sh, BT>(sx, b0, p.next_size, k0, G, k0 > 0, dz_next);
      if (column) dot_tile<Sh>(w, sx, G - k0, lane, acc);
      k0 += Sh::kCols;
      if (k0 >= G) break;
      w.load(w_row, 0, G, k0, lane, p.w_vec, column);
    }
  }
  warp_allreduce<1, BT>(acc);
  if (!column || lane >= BT) return;
  acc_t dot = pick<BT>(acc[0], lane);
  if constexpr (kRegs) {
    if (b < p.next_size) dot = carried_dh(p.regs, dot, p.next_start + b, b, u, p.Hr, p.dh_keep);
  }
  if (b < p.bs) {
    acc_t dh = step_dh<T, acc_t>(dot, row, b, u, p.Hr, p.next_size, p.dy, p.ghn);
    if constexpr (kRegs) dh = split_dh(p.regs, dh, row, b, u, p.Hr, p.dh_keep);
    if constexpr (kFuseUnit) {
      backward_unit<T, acc_t, kRegs>(row, b, u, p.H, dh, saved, p.dc_run, p.dz, nullptr, p.regs);
    } else {
      p.dh_all[row * p.Hr + u] = static_cast<T>(dh);
    }
    p.h_prev[row * p.Hr + u] = static_cast<T>(h_prev);
  } else if (b < p.next_size) {
    p.grad_h0[b * p.Hr + u] = static_cast<T>(dot);
  }
}

// Projection only: the gate backward of this step, one thread per (b, j), from dm = dh W_hr.
template <typename T, typename acc_t, bool kRegs>
__global__ void __launch_bounds__(kThreads) backward_unit_kernel(const BackwardStep<T, acc_t> p) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= p.bs * p.H) return;
  const int64_t b = i / p.H, j = i - b * p.H, row = p.start + b;
  const UnitSaved<acc_t> saved = load_unit<T, acc_t>(row, prev_row(b, p.prev_start, p.prev_size), b,
                                                     j, p.H, p.acts, p.cells, p.c0, p.dc_run);
  backward_unit<T, acc_t, kRegs>(row, b, j, p.H, static_cast<acc_t>(p.dm[b * p.H + j]), saved,
                                 p.dc_run, p.dz, p.m_all, p.regs);
}

}  // namespace
}  // namespace fused_lstm

// The CUDA kernels of one step, forward and backward, and their parameter structs: what each
// block and lane computes. step_loops.cuh launches them step by step; the per-thread arithmetic
// they call is lstm_cuda_thread.h's. Their definitions have internal linkage, one copy per
// translation unit that launches them.
//
// A step's time is mostly memory latency, so each kernel issues its global loads together and
// waits on them once per tile of the reduction (docs/cuda.md#memory-reads):
//   1. the warp's weight rows for the tile, raw 16-byte loads into registers (WeightTile),
//      converted where the dot products use them; before the first tile they do not depend on
//      the previous step, so they are issued before FL_WAIT_PRIOR_GRIDS, overlapping the
//      previous launch's tail where launches are chained;
//   2. the block's batch rows of the operand (h_{t-1}, or the next visited step's dz), 16-byte
//      loads from row pointers chosen per row, no branch between them, every load issued before
//      any store to shared memory, then one barrier;
//   3. the dot products, from registers and 16-byte shared-memory reads;
// and the epilogue's inputs are loaded before the first tile, so they wait with it. Every row
// the kernels read in vectors is 16-byte aligned with a stride that is a whole number of
// vectors and zeros past its end: the host pads what is not (step_loops.cuh's vector_rows). A
// warp's sums are reduced with a reduce-scatter (warp_reduce_scatter), fewer than N + 5
// shuffles for N sums rather than 5 N.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../lstm_gates.h"
#include "gpu_runtime.h"
#include "lstm_cuda_thread.h"

namespace fused_lstm {
namespace {

using namespace cuda_work;
using gpu::Vec;

// A tile's budget, set so that no kernel spills (benchmarks/cuda_resources.py --check): a lane's
// raw weights take at most kWeightRegs registers; the staged rows take at most Tile::kStageBytes
// of shared memory and a thread holds at most Tile::kStageRegs registers of them raw between its
// loads and its stores.
constexpr int kWeightRegs = 48;

constexpr int min_int(int a, int b) { return a < b ? a : b; }

// Blocks of the backward step that must fit an SM at once: two at BT = 8 (at most 128 registers
// a thread), so that B16 H768's 192 blocks run in one wave on 132 SMs; one at smaller batch
// tiles, whose grids (B <= 4: one block row) fit a wave anyway, and in double, whose tiles spill
// under 128 registers.
template <typename acc_t, int BT>
constexpr int kBackwardBlocksPerSM = sizeof(acc_t) <= 4 && BT == 8 ? 2 : 1;

// The shape of a tile for storage type T, accumulation type acc_t, BT batch rows and NG weight
// rows per warp: every lane reads kUnroll vectors of kVec columns from each row, and the tile is
// the kCols columns the whole warp reads. Staged: the type of the staged rows in shared memory.
// The forward's are converted to acc_t as they are staged, once for the NG = 4 rows that use
// them; the backward's stay T, converted where used, which keeps the fused bfloat16 backward in
// its 128 registers (two blocks an SM) and, in 16-bit types, halves its tiles' bytes.
template <typename T, typename acc_t, int BT, int NG>
struct Tile {
  using Staged = std::conditional_t<NG == 1, T, acc_t>;
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  static constexpr int kLaneSpan = kWarpSize * kVec;
  // The forward: 16 registers (its accumulators take four times the backward's) and 32 KiB. A
  // backward held to 128 registers (kBackwardBlocksPerSM): 24 and 32 KiB, since 48 KiB spills its
  // bfloat16 kernel. The other backward kernels: 48 and 48 KiB, the most a block may declare
  // statically, which takes float64's B16 H768 step from 6 tiles to 4.
  static constexpr bool kOneBlock = NG == 1 && kBackwardBlocksPerSM<acc_t, BT> == 1;
  static constexpr int kStageRegs = NG == 4 ? 16 : kOneBlock ? 48 : 24;
  static constexpr int kStageBytes = kOneBlock ? 48 * 1024 : 32 * 1024;
  static constexpr int kUnroll =
      min_int(min_int(kWeightRegs / (NG * 4), kStageRegs* kThreads / (BT * kWarpSize * 4)),
              kStageBytes / (BT * static_cast<int>(sizeof(Staged))) / kLaneSpan);
  static constexpr int kCols = kUnroll * kLaneSpan;
  static_assert(kUnroll >= 1, "a lane reads at least one vector of each row");
};

// ---- device-only pieces: weight tiles, staging, dot products, warp reductions ---------------

// A lane's share of NG weight rows (w + g * stride, g < NG, n long, read in vectors) over the
// tile at k0: vector u holds columns k0 + (u * kWarpSize + lane) * kVec, .. + kVec. A vector at
// or past n is read from the row's start instead (dot_tile skips it), so no load is guarded.
template <typename T, int NG, int kUnroll>
struct WeightTile {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  Vec<T, kVec> v[NG][kUnroll];

  __device__ __forceinline__ void load(const T* w, int64_t stride, int64_t n, int64_t k0,
                                       int lane) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u * kWarpSize + lane) * kVec;
      const int64_t kk = k < n ? k : 0;
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        v[g][u] = FL_LOAD_VEC(reinterpret_cast<const Vec<T, kVec>*>(w + g * stride + kk));
      }
    }
  }
};

// The forward's staged operand, what enters the recurrent product: h_{t-1} of batch row bb, the
// previous step's row of out where bb was active there, else h0's (chosen by pointer); with
// kRegs times recurrent_mask (where given) and zero where this step's row is reset.
template <typename T>
struct EnteringRows {
  const T *out, *h0, *mask;
  const bool* reset;
  int64_t ld, start, prev_start, prev_size;
  __device__ __forceinline__ const T* row(int64_t bb) const {
    return bb < prev_size ? out + (prev_start + bb) * ld : h0 + bb * ld;
  }
};

// The backward's: the next visited step's dz of batch row bb.
template <typename T>
struct DzRows {
  const T* dz;
  int64_t ld, next_start;
  __device__ __forceinline__ const T* row(int64_t bb) const { return dz + (next_start + bb) * ld; }
};

// Stages BT rows of the tile at k0 into sx (BT x kCols, Sh::Staged): columns k < n of batch rows
// b < rows, zeros elsewhere. Each thread loads its vectors, unguarded (one out of range reads
// row b0's first vector and stores zeros), then converts and stores them. The barrier between
// lets every warp finish reading the previous tile; before the first tile it keeps the compiler
// from storing each vector as it arrives, one round trip each, where no earlier tile needs it.
template <typename Sh, int BT, bool kRegs, typename T, typename acc_t, typename Rows>
__device__ __forceinline__ void stage_tile(typename Sh::Staged* sx, int64_t b0, int64_t rows,
                                           int64_t k0, int64_t n, const Rows& src) {
  using V = Vec<T, Sh::kVec>;
  using S = typename Sh::Staged;
  constexpr int kRowVecs = Sh::kCols / Sh::kVec;
  constexpr int kPer = (BT * kRowVecs + kThreads - 1) / kThreads;
  constexpr int kX = min_int(Sh::kVec, 16 / static_cast<int>(sizeof(S)));
  V v[kPer], mask[kRegs ? kPer : 1];
  bool ok[kPer], fresh[kRegs ? kPer : 1];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    const int64_t r = e / kRowVecs, k = k0 + (e % kRowVecs) * Sh::kVec;
    ok[i] = e < BT * kRowVecs && b0 + r < rows && k < n;
    const int64_t bb = ok[i] ? b0 + r : b0, kk = ok[i] ? k : 0;
    v[i] = FL_LOAD_VEC(reinterpret_cast<const V*>(src.row(bb) + kk));
    if constexpr (kRegs) {
      // Without a mask the load reads h0 and stands for 1; without resets none is read.
      const T* m = src.mask != nullptr ? src.mask + bb * src.ld + kk : src.h0;
      mask[i] = FL_LOAD_VEC(reinterpret_cast<const V*>(m));
      fresh[i] = src.reset != nullptr && src.reset[src.start + bb];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = static_cast<int>(threadIdx.x) + i * kThreads;
    if (e >= BT * kRowVecs) continue;
    bool live = ok[i];
    if constexpr (kRegs) live = live && !fresh[i];
    S* dst = sx + (e / kRowVecs) * Sh::kCols + (e % kRowVecs) * Sh::kVec;
    if constexpr (std::is_same_v<S, T> && !kRegs) {
      *reinterpret_cast<V*>(dst) = live ? v[i] : V{};
    } else {
#pragma unroll
      for (int e0 = 0; e0 < Sh::kVec; e0 += kX) {
        Vec<S, kX> x;
#pragma unroll
        for (int c = 0; c < kX; ++c) {
          acc_t h = live ? static_cast<acc_t>(v[i].v[e0 + c]) : acc_t(0);
          if constexpr (kRegs) {
            if (src.mask != nullptr) h *= static_cast<acc_t>(mask[i].v[e0 + c]);
          }
          x.v[c] = static_cast<S>(h);
        }
        *reinterpret_cast<Vec<S, kX>*>(dst + e0) = x;
      }
    }
  }
  __syncthreads();
}

// acc[r * NG + g] += the lane's share of w row g times staged row r over the tile (kc columns
// from the tile's start are real; vectors past them are skipped).
template <typename Sh, int NG, int BT, typename T, typename acc_t>
__device__ __forceinline__ void dot_tile(const WeightTile<T, NG, Sh::kUnroll>& w,
                                         const typename Sh::Staged* sx, int64_t kc, int lane,
                                         acc_t (&acc)[NG * BT]) {
  using S = typename Sh::Staged;
  constexpr int kX = min_int(Sh::kVec, 16 / static_cast<int>(sizeof(S)));
#pragma unroll
  for (int u = 0; u < Sh::kUnroll; ++u) {
    const int k = (u * kWarpSize + lane) * Sh::kVec;
    if (k >= kc) continue;
    acc_t wv[NG][Sh::kVec];
#pragma unroll
    for (int g = 0; g < NG; ++g) {
#pragma unroll
      for (int e = 0; e < Sh::kVec; ++e) wv[g][e] = static_cast<acc_t>(w.v[g][u].v[e]);
    }
#pragma unroll
    for (int r = 0; r < BT; ++r) {
#pragma unroll
      for (int e0 = 0; e0 < Sh::kVec; e0 += kX) {
        const Vec<S, kX> x =
            FL_LOAD_VEC(reinterpret_cast<const Vec<S, kX>*>(sx + r * Sh::kCols + k + e0));
#pragma unroll
        for (int e = 0; e < kX; ++e) {
          const acc_t xe = static_cast<acc_t>(x.v[e]);
#pragma unroll
          for (int g = 0; g < NG; ++g) acc[r * NG + g] += wv[g][e0 + e] * xe;
        }
      }
    }
  }
}

// Sums each of a lane's N values over the warp by a reduce-scatter: at the round of offset kOff
// a lane keeps half of its kN values (the upper half where its lane bit kOff is set), adds its
// partner's copy of that half and sends the other; once one value is left the rounds add it
// whole. Fewer than N + 5 shuffles in all. Afterwards lane L holds the sums of the kSlots values
// ScatteredSums names.
template <int kOff, int kN, int N, typename acc_t>
__device__ __forceinline__ void reduce_rounds(acc_t (&a)[N], int lane) {
  if constexpr (kOff > 0) {
    if constexpr (kN > 1) {
      constexpr int h = kN / 2;
      const bool upper = (lane & kOff) != 0;
#pragma unroll
      for (int i = 0; i < h; ++i) {
        const acc_t send = upper ? a[i] : a[i + h];
        const acc_t keep = upper ? a[i + h] : a[i];
        a[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOff);
      }
      reduce_rounds<kOff / 2, h>(a, lane);
    } else {
      a[0] += __shfl_xor_sync(0xffffffffu, a[0], kOff);
      reduce_rounds<kOff / 2, 1>(a, lane);
    }
  }
}

// Where warp_reduce_scatter leaves the sum of value v of N: in slot v % kSlots of lane
// (v / kSlots) * kSpread (and the kSpread - 1 lanes after it).
template <int N>
struct ScatteredSums {
  static constexpr int kSlots = N >= kWarpSize ? N / kWarpSize : 1;
  static constexpr int kSpread = N >= kWarpSize ? 1 : kWarpSize / N;
  static_assert((N & (N - 1)) == 0, "a power of two");
};

template <int N, typename acc_t>
__device__ __forceinline__ void warp_reduce_scatter(acc_t (&a)[N], int lane) {
  reduce_rounds<kWarpSize / 2, N>(a, lane);
}

// The sum of value v (v < N; each lane may ask for another) after warp_reduce_scatter: kSlots
// shuffles, which every lane of the warp must reach.
template <int N, typename acc_t>
__device__ __forceinline__ acc_t scattered_sum(const acc_t (&a)[N], int v) {
  using S = ScatteredSums<N>;
  const int src = v / S::kSlots * S::kSpread;
  acc_t out = a[0];
#pragma unroll
  for (int s = 0; s < S::kSlots; ++s) {
    const acc_t t = __shfl_sync(0xffffffffu, a[s], src);
    out = v % S::kSlots == s ? t : out;
  }
  return out;
}

// ---- forward step ---------------------------------------------------------------------------

template <typename T, typename acc_t>
struct ForwardStep {
  const T* w_hh;     // (4H, ld)
  const T* h0;       // (B, ld)
  T* gates;          // (rows, 4H)
  T* cells;          // (rows, H)
  T* out;            // (rows, ld): h_{t-1} is read from the previous step's rows
  T* m;              // (B, H) with projection, else nullptr
  T* h_n;            // (B, Hr), written without projection
  acc_t* c_run;      // (B, H)
  StepRegs<T> regs;  // recurrent_mask (B, ld)
  // ld: the row stride of w_hh, h0, out and recurrent_mask, Hr rounded up to a whole vector.
  int64_t H, Hr, ld, start, bs, prev_start, prev_size;
};

// grid (ceil(H / kWarps), ceil(bs / BT)), block kThreads. Warp w of block (x, y) owns hidden
// unit j = x * kWarps + w (rows j, H+j, 2H+j, 3H+j of W_hh) for batch rows [y*BT, y*BT + BT);
// the block stages those rows of h_{t-1} in shared memory a tile at a time, and the lanes split
// each tile's columns (WeightTile). Lane r then applies the gate math for row y*BT+r; its inputs
// (this step's x W_ih^T + b, c_{t-1}) are loaded before the first tile, raw, with addresses
// clamped into range rather than guarded, and converted after the reduction.
// kRegs: the staged h_{t-1} is the entering state times recurrent_mask (see forward_unit).
// One block an SM spelled out: without it ptxas held float's BT = 1 kernel to 64 registers and
// spilled (benchmarks/cuda_resources.py).
template <typename T, typename acc_t, int BT, bool kRegs>
__global__ void __launch_bounds__(kThreads, 1) forward_step_kernel(const ForwardStep<T, acc_t> p) {
  using Sh = Tile<T, acc_t, BT, 4>;
  FL_SHARED_ARRAY(typename Sh::Staged, sx, BT * Sh::kCols);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * BT;
  const bool unit = j < p.H;
  const int64_t jj = unit ? j : 0;
  const T* w_rows = p.w_hh + jj * p.ld;
  WeightTile<T, 4, Sh::kUnroll> w;
  w.load(w_rows, p.H * p.ld, p.Hr, 0, lane);
  FL_WAIT_PRIOR_GRIDS();
  FL_RELEASE_DEPENDENTS();

  const int64_t b = b0 + lane;
  const bool finisher = unit && lane < BT && b < p.bs;
  const int64_t bb = finisher ? b : b0, row = p.start + bb;
  T z_raw[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) z_raw[g] = p.gates[row * 4 * p.H + g * p.H + jj];
  const acc_t c_prev = p.c_run[bb * p.H + jj];
  // kRegs: the regularisers at (row, j), and the h_{t-1}[b, j] that zoneout_hidden mixes in.
  RegsAt<T> ra{};
  T h_raw = T(0.0f);
  if constexpr (kRegs) {
    ra = p.regs.at(row, jj, jj, p.h0);
    h_raw = *h_prev_at(bb, jj, p.ld, p.prev_start, p.prev_size, p.out, p.h0);
  }

  acc_t acc[4 * BT];
#pragma unroll
  for (int i = 0; i < 4 * BT; ++i) acc[i] = acc_t(0);
  const EnteringRows<T> h_rows{p.out, p.h0,    p.regs.recurrent_mask, p.regs.reset,
                               p.ld,  p.start, p.prev_start,          p.prev_size};
  for (int64_t k0 = 0;;) {
    stage_tile<Sh, BT, kRegs, T, acc_t>(sx, b0, p.bs, k0, p.Hr, h_rows);
    if (unit) dot_tile<Sh, 4, BT>(w, sx, p.Hr - k0, lane, acc);
    k0 += Sh::kCols;
    if (k0 >= p.Hr) break;
    w.load(w_rows, p.H * p.ld, p.Hr, k0, lane);
  }
  warp_reduce_scatter<4 * BT>(acc, lane);
  acc_t z[4];
#pragma unroll
  for (int g = 0; g < 4; ++g) {
    z[g] = static_cast<acc_t>(z_raw[g]) + scattered_sum<4 * BT>(acc, lane % BT * 4 + g);
  }
  if (finisher) {
    const acc_t h_prev = p.regs.fresh(ra) ? acc_t(0) : static_cast<acc_t>(h_raw);
    forward_unit<T, acc_t, kRegs>(row, b, j, p.H, p.ld, z, c_prev, p.gates, p.cells, p.c_run, p.m,
                                  p.out, p.h_n, p.regs, ra, h_prev);
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
      entering_h<T, acc_t>(p.regs, row, b, k, p.ld, p.prev_start, p.prev_size, p.out, p.h0);
  T& y = p.out[row * p.ld + k];
  y = static_cast<T>(
      zoneout_mix(p.regs.zh.template at<acc_t>(row, k), h_prev, static_cast<acc_t>(y)));
}

// ---- backward step --------------------------------------------------------------------------

template <typename T, typename acc_t>
struct BackwardStep {
  const T* w_hh_t;  // (Hr, ldg)
  const T* dy;      // (rows, Hr) or nullptr
  const T* ghn;     // (B, Hr) or nullptr
  const T* acts;    // (rows, 4H)
  const T* cells;   // (rows, H)
  const T* c0;      // (B, H)
  const T* dm;      // (B, H) with projection: dh_t W_hr of this step
  T* dz;            // (rows, ldg): rows of the next visited step read, this step's written
  T* dh_all;        // (rows, Hr) with projection
  T* m_all;         // (rows, H) with projection
  T* grad_h0;       // (B, Hr)
  const T* y;       // (rows, Hr): the forward's output, h_{t-1} of the following steps
  const T* h0;      // (B, Hr)
  T* h_prev;        // (rows, Hr): what entered this step's recurrent product, for dW_hh
  acc_t* dc_run;    // (B, H)
  acc_t* dh_keep;   // (B, Hr) with zoneout_hidden
  StepRegs<T> regs;
  // ldg: the row stride of w_hh_t and dz, 4H rounded up to a whole vector.
  int64_t H, Hr, ldg, start, bs, next_start, next_size, prev_start, prev_size;
};

// grid (ceil(Hr / kWarps), ceil(max(bs, next_size) / BT)), block kThreads.
// Warp w owns column u = x * kWarps + w of dh (row u of W_hh^T) for batch rows [y*BT, y*BT + BT);
// the block stages those rows of the next visited step's dz. Lane r then finishes row
// b = y*BT + r:
//   b < bs:              dh_t = dot + dy, or dy + grad_h_n (step_dh); kFuseUnit: the gate backward
//   of
//                        unit u (Hr == H), else dh_all for the host's dm = dh W_hr
//   bs <= b < next_size: the next step was b's first visited one, so dot is grad_h0[b].
// The call after the loop (bs = 0, next = the first visited step) produces the rest of grad_h0.
// kRegs: dot becomes carried_dh (recurrent mask, zoneout_hidden's kept part, resets), and dh_t
// is split by zoneout_hidden (split_dh) before the gate backward or dh_all.
template <typename T, typename acc_t, int BT, bool kFuseUnit, bool kRegs>
__global__ void __launch_bounds__(kThreads, kBackwardBlocksPerSM<acc_t, BT>)
    backward_step_kernel(const BackwardStep<T, acc_t> p) {
  using Sh = Tile<T, acc_t, BT, 1>;
  FL_SHARED_ARRAY(typename Sh::Staged, sx, BT * Sh::kCols);
  const int lane = threadIdx.x % kWarpSize;
  const int64_t u = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int64_t b0 = static_cast<int64_t>(blockIdx.y) * BT;
  const int64_t G = 4 * p.H;
  const bool column = u < p.Hr;
  const int64_t uu = column ? u : 0;
  const T* w_row = p.w_hh_t + uu * p.ldg;
  WeightTile<T, 1, Sh::kUnroll> w;
  w.load(w_row, 0, G, 0, lane);
  // The epilogue's inputs of lane r (batch row b = b0 + r, or b0 where lane r finishes no row;
  // row = its row at this step, inside the buffers where b < next_size too), loaded before the
  // reduction: h_{t-1} for dW_hh (the forward's output, not written here), the
  // output's gradient, and the unit's saved state.
  const int64_t b = b0 + lane;
  const bool live = column && lane < BT && (b < p.bs || b < p.next_size);
  const int64_t bb = live ? b : b0, row = p.start + bb;
  const int64_t prow = prev_row(bb, p.prev_start, p.prev_size);
  const T h_raw = *h_prev_at(bb, uu, p.Hr, p.prev_start, p.prev_size, p.y, p.h0);
  // kRegs: the regularisers at (row, u), recurrent_mask[b, u], and whether the next visited
  // step's row of b was reset.
  RegsAt<T> ra{};
  T mask = T(0.0f);
  uint8_t reset_next = 0;
  if constexpr (kRegs) {
    ra = p.regs.at(row, uu, uu, p.h0);
    mask = *(p.regs.recurrent_mask != nullptr ? p.regs.recurrent_mask + bb * p.Hr + uu : p.h0);
    reset_next = *p.regs.reset_at(p.next_start + bb, p.h0);
  }
  FL_WAIT_PRIOR_GRIDS();
  FL_RELEASE_DEPENDENTS();
  // Unguarded too: an absent dy or grad_h_n reads h0 in its place and counts as 0; dh_keep
  // (written by the previous launch) reads dc_run.
  const T dy = *(p.dy != nullptr ? p.dy + row * p.Hr + uu : p.h0);
  const T ghn = *(p.ghn != nullptr ? p.ghn + bb * p.Hr + uu : p.h0);
  acc_t keep = acc_t(0);
  if constexpr (kRegs) keep = *(p.dh_keep != nullptr ? p.dh_keep + bb * p.Hr + uu : p.dc_run);
  UnitSaved<T, acc_t> saved{};
  if constexpr (kFuseUnit) {
    saved = load_unit<T, acc_t>(row, prow, bb, uu, p.H, p.acts, p.cells, p.c0, p.dc_run);
  }
  acc_t acc[BT];
#pragma unroll
  for (int r = 0; r < BT; ++r) acc[r] = acc_t(0);
  if (b0 < p.next_size) {  // uniform over the block, so the barriers below stay uniform
    const DzRows<T> dz_rows{p.dz, p.ldg, p.next_start};
    for (int64_t k0 = 0;;) {
      stage_tile<Sh, BT, false, T, acc_t>(sx, b0, p.next_size, k0, G, dz_rows);
      if (column) dot_tile<Sh, 1, BT>(w, sx, G - k0, lane, acc);
      k0 += Sh::kCols;
      if (k0 >= G) break;
      w.load(w_row, 0, G, k0, lane);
    }
  }
  warp_reduce_scatter<BT>(acc, lane);
  acc_t dot = scattered_sum<BT>(acc, lane % BT);
  if (!column || lane >= BT) return;
  if constexpr (kRegs) {
    if (b < p.next_size)
      dot = carried_dh(p.regs, dot, p.regs.reset != nullptr && reset_next, mask, keep);
  }
  if (b < p.bs) {
    acc_t dh = step_dh(dot, b, p.next_size, p.dy != nullptr ? static_cast<acc_t>(dy) : acc_t(0),
                       p.ghn != nullptr ? static_cast<acc_t>(ghn) : acc_t(0));
    if constexpr (kRegs) dh = split_dh(p.regs, ra, dh, b, u, p.Hr, p.dh_keep);
    if constexpr (kFuseUnit) {
      backward_unit<T, acc_t, kRegs>(row, b, u, p.H, p.ldg, dh, saved, p.dc_run, p.dz, nullptr,
                                     p.regs, ra);
    } else {
      p.dh_all[row * p.Hr + u] = static_cast<T>(dh);
    }
    // dW_hh's operand: what entered the recurrent product, h_{t-1} (zero after a reset) times
    // recurrent_mask.
    if constexpr (kRegs) {
      acc_t h = p.regs.fresh(ra) ? acc_t(0) : static_cast<acc_t>(h_raw);
      if (p.regs.recurrent_mask != nullptr) h *= static_cast<acc_t>(mask);
      p.h_prev[row * p.Hr + u] = static_cast<T>(h);
    } else {
      p.h_prev[row * p.Hr + u] = h_raw;
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
  const int64_t b = i / p.H, j = i - b * p.H, row = p.start + b;
  const UnitSaved<T, acc_t> saved = load_unit<T, acc_t>(row, prev_row(b, p.prev_start, p.prev_size),
                                                        b, j, p.H, p.acts, p.cells, p.c0, p.dc_run);
  backward_unit<T, acc_t, kRegs>(row, b, j, p.H, p.ldg, static_cast<acc_t>(p.dm[b * p.H + j]),
                                 saved, p.dc_run, p.dz, p.m_all, p.regs,
                                 p.regs.at(row, j, 0, p.h0));
}

}  // namespace
}  // namespace fused_lstm

// The gate math of a step, forward and backward, over rows and units: the CPU side of
// lstm_gates.h, compiled per ISA (isa.h).
#pragma once

#include <cstdint>

#include "../lstm_gates.h"
#include "isa.h"

namespace fused_lstm {
// Internal to lstm_cpu.cpp, the one file that includes this header: its definitions keep that
// file's internal linkage, so that the compiler sees the loops whole and inlines across headers.
namespace {

using namespace tuning;

// Gate math of units [j0, j1) of rows b0..b1 of one step: z (bs, 4H) holds the pre-activations
// and receives the activations; c (bs, H) is c_{t-1} in, c_t out; cell (bs, H) saves c_t;
// m (bs, H) gets m_t. slope (4H) is gate_slope of each column. For all units the four gates are
// one pass over the row's 4H contiguous values, which is whole registers for any even H and
// independent work throughout; a pass per gate would leave a partial register at the end of
// each of the seeds' H = 4..20.
// With Zoneout, c_t mixes c_{t-1} and the plain update with the weights of row b at
// zc[b * zc_ld] (StepRegs), and m_t stays that of the plain update.
template <typename T, bool Zoneout>
struct ForwardPointwiseRows {
  template <CpuIsa>
  static FL_ISA_BODY void run(T* __restrict z, T* __restrict c, T* __restrict cell, T* __restrict m,
                              const T* __restrict slope, const T* __restrict zc, int64_t zc_ld,
                              int64_t H, int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
    const bool all = j0 == 0 && j1 == H;
    for (int64_t b = b0; b < b1; ++b) {
      T* __restrict zr = z + b * 4 * H;
      for (int64_t q = 0; q < (all ? 1 : 4); ++q) {
        for (int64_t k = q * H + j0; k < (all ? 4 * H : q * H + j1); ++k) {
          zr[k] = gate_act<T>(zr[k], slope[k]);
        }
      }
      const T* __restrict i = zr;
      const T* __restrict f = zr + H;
      const T* __restrict g = zr + 2 * H;
      const T* __restrict o = zr + 3 * H;
      T* __restrict cr = c + b * H;
      T* __restrict cellr = cell + b * H;
      T* __restrict mr = m + b * H;
      const T* __restrict dr = Zoneout ? zc + b * zc_ld : nullptr;
      for (int64_t j = j0; j < j1; ++j) {
        const CellUpdate<T> u = cell_update<T>(i[j], f[j], g[j], o[j], cr[j]);
        const T ct = Zoneout ? zoneout_mix<T>(dr[j], cr[j], u.c) : u.c;
        cr[j] = ct;
        cellr[j] = ct;
        mr[j] = u.m;
      }
    }
  }
};

// Backward gate math of rows b0..b1 of one step. act (bs, 4H) and cell (bs, H) are the saved
// activations and c_t; row b takes c_{t-1} from prev_cell (the previously visited step) when
// b < prev_size, else from c0. dm (bs, H) is dL/dm_t; dc (bs, H) is dL/dc_t in, dL/dc_{t-1}
// out; dz (bs, 4H) receives dL/dz; m, when not null, receives m_t (for dW_hr).
// With Regs, c_{t-1} is zero where reset[b] is set (reset may be null), and dL/dc_t splits
// between the plain update, recomputed from the activations and c_{t-1} (cell holds the mixed
// state), and c_{t-1} by the zoneout weights of row b at zc[b * zc_ld] (StepRegs).
template <typename T, bool Regs>
struct BackwardPointwiseRows {
  template <CpuIsa>
  static FL_ISA_BODY void run(const T* __restrict act, const T* __restrict cell,
                              const T* __restrict prev_cell, int64_t prev_size,
                              const T* __restrict c0, const bool* __restrict reset,
                              const T* __restrict zeros, const T* __restrict zc, int64_t zc_ld,
                              const T* __restrict dm, T* __restrict dc, T* __restrict dz,
                              T* __restrict m, int64_t H, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const T* __restrict i = act + b * 4 * H;
      const T* __restrict f = i + H;
      const T* __restrict g = i + 2 * H;
      const T* __restrict o = i + 3 * H;
      const T* __restrict cr = cell + b * H;
      const T* __restrict cp = Regs && reset && reset[b] ? zeros
                               : b < prev_size           ? prev_cell + b * H
                                                         : c0 + b * H;
      const T* __restrict dr = Regs ? zc + b * zc_ld : nullptr;
      const auto plain_c = [&](int64_t j) { return Regs ? f[j] * cp[j] + i[j] * g[j] : cr[j]; };
      const T* __restrict dmr = dm + b * H;
      T* __restrict dcr = dc + b * H;
      T* __restrict di = dz + b * 4 * H;
      T* __restrict df = di + H;
      T* __restrict dg = di + 2 * H;
      T* __restrict d_o = di + 3 * H;
      for (int64_t j = 0; j < H; ++j) {
        const ZoneoutGrad<T> split = Regs ? zoneout_grad<T>(dr[j], dcr[j]) : ZoneoutGrad<T>{dcr[j]};
        const auto u =
            unit_backward<T>(dmr[j], split.update, i[j], f[j], g[j], o[j], plain_c(j), cp[j]);
        di[j] = u.di;
        df[j] = u.df;
        dg[j] = u.dg;
        d_o[j] = u.do_;
        dcr[j] = Regs ? u.dc_prev + split.prev : u.dc_prev;
      }
      if (m) {
        T* __restrict mr = m + b * H;
        for (int64_t j = 0; j < H; ++j) mr[j] = unit_m<T>(o[j], plain_c(j));
      }
    }
  }
};

}  // namespace
}  // namespace fused_lstm

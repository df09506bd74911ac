// The per-thread work of the CUDA step kernels (step_kernels.cuh), as __host__ __device__
// functions of raw pointers: index arithmetic, the loads of the entering state, and the per-unit
// epilogues that wrap the gate math of lstm_gates.h. The kernels themselves, shared-memory
// staging and warp shuffles included, run on the host under the CUDA emulator (csrc/emulator).
//
// Buffers (one layer, one direction; rows = T*B padded or sum(batch_sizes) packed; G = 4H;
// the kernels read the rows marked * in 16-byte vectors, so their stride is rounded up to a whole
// vector: ld for Hr, ldg for G, zeros in between, by step_loops.cuh's vector_rows):
//   w_hh   (G, Hr)*   PyTorch layout, gate rows i, f, g, o
//   w_hh_t (Hr, G)*   w_hh transposed once per backward call, so the reduction over G that
//                     produces dh reads contiguous memory across a warp's lanes
//   gates  (rows, G)  forward: x W_ih^T + b on entry, activations i, f, g, o on exit
//   cells  (rows, H)  c_t            out (rows, Hr)* y_t (h_t, or m_t W_hr^T with projection)
//   h0 (B, Hr)*, h_n (B, Hr)   c0 (B, H)   c_run, dc_run (B, H) in acc_t: running (d)c state
//   m      (B, H)     m_t of the current step (projection only)
//   dz     (rows, G)* dL/dz          dh_all (rows, Hr)  dL/dh_t (projection only)
//   m_all  (rows, H)  m_t recomputed in the backward (projection only)
//   dh_keep (B, Hr)   acc_t: the part of dL/dh_t that zoneout_hidden keeps for h_{t-1}
// The backward reads out (as y) and h0 at stride Hr, element by element.
// The regularisers and resets (StepRegs): recurrent_mask (B, Hr; the forward's *), reset (rows),
// zoneout weights (rows, H) / (rows, Hr) masks or 0-dim rates.
#pragma once

#include <cstdint>
#include <optional>

#include "../layer_args.h"
#include "../lstm_gates.h"

namespace fused_lstm {
namespace cuda_work {

constexpr int kWarpSize = 32;
// A block is kWarps warps; warp w owns one output column (hidden unit j in the forward, dh
// component u in the backward) and its lanes split the reduction dimension, so every lane's
// weight loads are contiguous across the warp.
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;

// The row that holds batch row b's state before the current step: the previously visited
// step's row when b was active there, else -1 (take row b of h0 / c0).
FL_HD int64_t prev_row(int64_t b, int64_t prev_start, int64_t prev_size) {
  return b < prev_size ? prev_start + b : -1;
}

// Where component k of h_{t-1} for batch row b is; `out` is the layer output and h0 the initial
// state, rows of stride ld (Hr, or the forward's padded stride).
template <typename T>
FL_HD const T* h_prev_at(int64_t b, int64_t k, int64_t ld, int64_t prev_start, int64_t prev_size,
                         const T* out, const T* h0) {
  const int64_t r = prev_row(b, prev_start, prev_size);
  return r >= 0 ? out + r * ld + k : h0 + b * ld + k;
}

template <typename T, typename acc_t>
FL_HD acc_t load_h_prev(int64_t b, int64_t k, int64_t ld, int64_t prev_start, int64_t prev_size,
                        const T* out, const T* h0) {
  return static_cast<acc_t>(*h_prev_at(b, k, ld, prev_start, prev_size, out, h0));
}

// A zoneout weight d at (row, k): an element of a (rows, width) mask (ld = width, inc = 1) or
// the 0-dim rate itself (ld = inc = 0), read where it is used so that a rate on the device needs
// no host synchronisation. p == nullptr: no zoneout.
template <typename T>
struct ZoneoutWeight {
  const T* p = nullptr;
  int64_t ld = 0, inc = 0;
  FL_HD bool on() const { return p != nullptr; }
  template <typename acc_t>
  FL_HD acc_t at(int64_t row, int64_t k) const {
    return static_cast<acc_t>(p[row * ld + k * inc]);
  }
  // On the host, from a contiguous mask or a 0-dim rate, or absent.
  static ZoneoutWeight of(const std::optional<at::Tensor>& z) {
    if (!z) return {};
    const bool rate = z->dim() == 0;
    return {z->const_data_ptr<T>(), rate ? 0 : z->size(-1), rate ? 0 : 1};
  }
};

// The regularisers and resets of one layer call (fused_lstm/op_schemas.inc) as the step kernels
// read them; any of them may be absent (nullptr). Only the kernels' kRegs instantiations read
// them, so that a call without any runs kernels with none of their loads or branches.
// The regularisers at one row of a step, as a kRegs epilogue reads them: loaded with the step's
// other inputs before its reduction, unguarded (an absent one reads another valid element in its
// place; StepRegs says which are real) and as stored, converted where used.
template <typename T>
struct RegsAt {
  uint8_t reset;  // nonzero: the row's step starts from the zero state
  T zc, zh;       // zoneout_cell's weight of the unit, zoneout_hidden's of the h component
};

template <typename T>
struct StepRegs {
  const T* recurrent_mask = nullptr;  // (B, Hr)
  const bool* reset = nullptr;        // (rows): that row's step starts from the zero state
  ZoneoutWeight<T> zc, zh;            // cells (rows, H), hidden (rows, Hr)
  FL_HD bool fresh(int64_t row) const { return reset != nullptr && reset[row]; }
  FL_HD bool fresh(const RegsAt<T>& r) const { return reset != nullptr && r.reset != 0; }
  // The reset flag of `row` as stored (any: a valid element read in place of an absent one).
  FL_HD const uint8_t* reset_at(int64_t row, const T* any) const {
    return reset != nullptr ? reinterpret_cast<const uint8_t*>(reset + row)
                            : reinterpret_cast<const uint8_t*>(any);
  }
  // Row `row`'s flag, zoneout_cell's weight of unit j and zoneout_hidden's of component k.
  FL_HD RegsAt<T> at(int64_t row, int64_t j, int64_t k, const T* any) const {
    return {*reset_at(row, any), *(zc.on() ? zc.p + row * zc.ld + j * zc.inc : any),
            *(zh.on() ? zh.p + row * zh.ld + k * zh.inc : any)};
  }
};

// On the host: the view of a call's regularisers, which LayerParams holds contiguous and alive
// for the launches that read them.
template <typename T>
StepRegs<T> step_regs(const Regularisers& r) {
  StepRegs<T> v;
  v.recurrent_mask = r.recurrent_mask ? r.recurrent_mask->const_data_ptr<T>() : nullptr;
  v.reset = r.reset ? r.reset->const_data_ptr<bool>() : nullptr;
  v.zc = ZoneoutWeight<T>::of(r.zoneout_cell);
  v.zh = ZoneoutWeight<T>::of(r.zoneout_hidden);
  return v;
}

// Component k of the state h_{t-1} that the step of `row` (batch row b) starts from: zero after a
// reset, unmasked (what zoneout_hidden keeps).
template <typename T, typename acc_t>
FL_HD acc_t entering_h(const StepRegs<T>& regs, int64_t row, int64_t b, int64_t k, int64_t ld,
                       int64_t prev_start, int64_t prev_size, const T* out, const T* h0) {
  return regs.fresh(row) ? acc_t(0)
                         : load_h_prev<T, acc_t>(b, k, ld, prev_start, prev_size, out, h0);
}

// Forward epilogue of unit j of batch row b at a step (row = its row in gates/cells/out):
// z holds the four gate pre-activations (x W_ih^T + b + h_{t-1} W_hh^T) and c_prev = c_{t-1}.
// Without projection (m == nullptr) h_t goes to out (rows of stride ld) and h_n; with it m_t goes
// to m and the host multiplies by W_hr afterwards. c_run is read and written only by this (b, j),
// so updating it in place is race-free. kRegs: a reset row starts from c_{t-1} = 0, zoneout_cell
// mixes c_t (m_t is of the plain update), and without projection zoneout_hidden mixes h_t with
// h_prev, the entering h_{t-1}[b, j] (with projection the host mixes after the product); ra: the
// regularisers at (row, j).
template <typename T, typename acc_t, bool kRegs>
FL_HD void forward_unit(int64_t row, int64_t b, int64_t j, int64_t H, int64_t ld,
                        const acc_t (&z)[4], acc_t c_prev, T* gates, T* cells, acc_t* c_run, T* m,
                        T* out, T* h_n, const StepRegs<T>& regs, const RegsAt<T>& ra,
                        acc_t h_prev) {
  if constexpr (kRegs) {
    if (regs.fresh(ra)) c_prev = acc_t(0);
  }
  const UnitForward<acc_t> u = unit_forward<acc_t>(z[0], z[1], z[2], z[3], c_prev);
  T* a = gates + row * 4 * H;
  a[j] = static_cast<T>(u.i);
  a[H + j] = static_cast<T>(u.f);
  a[2 * H + j] = static_cast<T>(u.g);
  a[3 * H + j] = static_cast<T>(u.o);
  acc_t c = u.c, h = u.m;
  if constexpr (kRegs) {
    if (regs.zc.on()) c = zoneout_mix(static_cast<acc_t>(ra.zc), c_prev, c);
    if (m == nullptr && regs.zh.on()) h = zoneout_mix(static_cast<acc_t>(ra.zh), h_prev, h);
  }
  cells[row * H + j] = static_cast<T>(c);
  c_run[b * H + j] = c;
  if (m != nullptr) {
    m[b * H + j] = static_cast<T>(h);
  } else {
    out[row * ld + j] = static_cast<T>(h);
    h_n[b * H + j] = static_cast<T>(h);
  }
}

// dL/dh_t of batch row b: the recurrent part `dot` (the next visited step's dz times W_hh; only
// rows active there have one), the output's gradient dy, and grad_h_n (ghn) where this is the
// row's last visited step (not active in the next); dy and ghn are 0 where not given.
template <typename acc_t>
FL_HD acc_t step_dh(acc_t dot, int64_t b, int64_t next_size, acc_t dy, acc_t ghn) {
  return (b < next_size ? dot : ghn) + dy;
}

// With regularisers, the part of dL/dh_{t-1} that batch row b (active in the next visited step)
// gets from that step, in place of its bare recurrent product `dot`: dot through
// recurrent_mask[b, u] (mask), plus what zoneout_hidden kept there (keep, dh_keep[b, u]), and
// nothing where that step started from a reset state (fresh_next).
template <typename T, typename acc_t>
FL_HD acc_t carried_dh(const StepRegs<T>& regs, acc_t dot, bool fresh_next, T mask, acc_t keep) {
  if (fresh_next) return acc_t(0);
  if (regs.recurrent_mask != nullptr) dot *= static_cast<acc_t>(mask);
  return regs.zh.on() ? dot + keep : dot;
}

// zoneout_hidden's split of dh = dL/dh_t at (row, u) of batch row b (ra: the regularisers
// there): returns the part of the plain update and leaves the kept part in dh_keep for the
// previous step (carried_dh), which only this (b, u) reads and writes.
template <typename T, typename acc_t>
FL_HD acc_t split_dh(const StepRegs<T>& regs, const RegsAt<T>& ra, acc_t dh, int64_t b, int64_t u,
                     int64_t Hr, acc_t* dh_keep) {
  if (!regs.zh.on()) return dh;
  const ZoneoutGrad<acc_t> g = zoneout_grad(static_cast<acc_t>(ra.zh), dh);
  dh_keep[b * Hr + u] = g.prev;
  return g.update;
}

// What the backward of unit j of batch row b reads besides dL/dm_t: its activations, c_t, c_{t-1}
// (cells[prow], prow = prev_row() of b, or c0[b]) and the running dc, as stored (T), so that a
// kernel can issue these loads before its reduction and convert them after it.
template <typename T, typename acc_t>
struct UnitSaved {
  T i, f, g, o, c, c_prev;
  acc_t dc;
};

template <typename T, typename acc_t>
FL_HD UnitSaved<T, acc_t> load_unit(int64_t row, int64_t prow, int64_t b, int64_t j, int64_t H,
                                    const T* acts, const T* cells, const T* c0,
                                    const acc_t* dc_run) {
  const T* a = acts + row * 4 * H;
  return {a[j],
          a[H + j],
          a[2 * H + j],
          a[3 * H + j],
          cells[row * H + j],
          *(prow >= 0 ? cells + prow * H + j : c0 + b * H + j),
          dc_run[b * H + j]};
}

// Backward epilogue of unit j of batch row b: dm = dL/dm_t, saved what load_unit read. Writes the
// four dz of the unit (rows of stride ldg) and dc_{t-1} into dc_run (read and written only by
// this (b, j)); with projection also m_t into m_all for dW_hr.
// kRegs (ra: the regularisers at (row, j)): c_{t-1} is 0 after a reset, and so is the dc_{t-1}
// that flows back; with zoneout_cell
// dc_run splits into the plain update and dc_{t-1}, and the plain update (which cells does not
// hold) is recomputed from the activations and c_{t-1}.
template <typename T, typename acc_t, bool kRegs>
FL_HD void backward_unit(int64_t row, int64_t b, int64_t j, int64_t H, int64_t ldg, acc_t dm,
                         const UnitSaved<T, acc_t>& saved, acc_t* dc_run, T* dz, T* m_all,
                         const StepRegs<T>& regs, const RegsAt<T>& ra) {
  struct {
    acc_t i, f, g, o, c, c_prev, dc;
  } s{static_cast<acc_t>(saved.i),
      static_cast<acc_t>(saved.f),
      static_cast<acc_t>(saved.g),
      static_cast<acc_t>(saved.o),
      static_cast<acc_t>(saved.c),
      static_cast<acc_t>(saved.c_prev),
      saved.dc};
  acc_t dc_kept = acc_t(0);
  if constexpr (kRegs) {
    if (regs.fresh(ra)) s.c_prev = acc_t(0);
    if (regs.zc.on()) {
      const ZoneoutGrad<acc_t> split = zoneout_grad(static_cast<acc_t>(ra.zc), s.dc);
      s.dc = split.update;
      dc_kept = split.prev;
      s.c = cell_update(s.i, s.f, s.g, s.o, s.c_prev).c;
    }
  }
  const UnitBackward<acc_t> u = unit_backward<acc_t>(dm, s.dc, s.i, s.f, s.g, s.o, s.c, s.c_prev);
  T* d = dz + row * ldg;
  d[j] = static_cast<T>(u.di);
  d[H + j] = static_cast<T>(u.df);
  d[2 * H + j] = static_cast<T>(u.dg);
  d[3 * H + j] = static_cast<T>(u.do_);
  acc_t dc_prev = u.dc_prev;
  if constexpr (kRegs) dc_prev = regs.fresh(ra) ? acc_t(0) : dc_prev + dc_kept;
  dc_run[b * H + j] = dc_prev;
  if (m_all != nullptr) m_all[row * H + j] = static_cast<T>(unit_m<acc_t>(s.o, s.c));
}

}  // namespace cuda_work
}  // namespace fused_lstm

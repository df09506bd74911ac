// The forward and backward recurrences over the steps of one layer and direction.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <optional>
#include <vector>

#include "../layer_args.h"
#include "../lstm_gates.h"
#include "pointwise.h"
#include "step_product.h"
#include "step_regs.h"

namespace fused_lstm {
// Internal to lstm_cpu.cpp, the one file that includes this header: its definitions keep that
// file's internal linkage, so that the compiler sees the loops whole and inlines across headers.
namespace {

using namespace tuning;

// The recurrence over the steps. Regs says whether regs (not null then) holds any regulariser
// or reset: without, no step does any of their work. With them, a step first zeroes the state of
// its reset rows and reads h_{t-1} * recurrent_mask from h_in in the product; the pointwise pass
// mixes c_t; h_t mixes the finished output row (after the projection) with h_{t-1} as it
// entered, which h still holds until the step's end.
// The weights the packs derive from, for the cache (PackSource): the call's own w_hh and w_hr
// (null where absent, or where the cache must not see them).
struct PackSources {
  const at::Tensor* w_hh = nullptr;
  const at::Tensor* w_hr = nullptr;
};

template <typename T, bool Regs>
void forward_loop(const StepLayout& L, const LayerDims& d, at::Tensor& gates, at::Tensor& cells,
                  at::Tensor& output, at::Tensor& h, at::Tensor& c, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& w_hr, const StepRegs<T>* regs,
                  const PackSources& sources) {
  const int64_t H = d.H, Hr = d.Hr;
  at::Tensor m = d.proj ? at::empty({d.B, H}, h.options()) : at::Tensor();
  const at::Tensor h_in = Regs && regs->mask ? at::empty({d.B, Hr}, h.options()) : h;
  // gates already holds x W_ih^T + b; this adds h_{t-1} W_hh^T.
  const int64_t steps = static_cast<int64_t>(L.start.size());
  const StepProduct<T> recurrent(w_hh, h_in, gates, d.B, steps, /*gate_blocks=*/true,
                                 {sources.w_hh});
  const std::optional<StepProduct<T>> projection =
      d.proj ? std::optional<StepProduct<T>>(std::in_place, *w_hr, m, output, d.B, steps,
                                             /*gate_blocks=*/false, PackSource{sources.w_hr})
             : std::nullopt;
  T* pz = gates.data_ptr<T>();
  T* pcell = cells.data_ptr<T>();
  T* py = output.data_ptr<T>();
  T* ph = h.data_ptr<T>();
  T* pc = c.data_ptr<T>();
  T* pm = d.proj ? m.data_ptr<T>() : nullptr;
  T* ph_in = h_in.data_ptr<T>();
  const bool zoneout_cell = Regs && regs->zoneout_cell;
  std::vector<T> slope(static_cast<size_t>(4 * H));
  for (int64_t k = 0; k < 4 * H; ++k) slope[k] = gate_slope<T>(k, H);

  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t start = L.start[s], bs = L.size[s];
    if constexpr (Regs) {
      if (regs->reset) {
        zero_reset_rows(regs->reset + start, bs, ph, Hr);
        zero_reset_rows(regs->reset + start, bs, pc, H);
      }
      if (regs->mask) {
        for (int64_t k = 0; k < bs * Hr; ++k) ph_in[k] = ph[k] * regs->mask[k];
      }
    }
    T* m_out = d.proj ? pm : py + start * Hr;
    T* y = py + start * Hr;
    // Split by rows, a thread's product reads only its own rows of h: it sets them to h_t itself
    // where h_t is m_t, rather than leaving the copy to one thread after the region, which read
    // the other cores' rows of y and then had them read back.
    const bool own_rows = !d.proj && !(Regs && regs->zh) && recurrent.splits_rows(bs);
    const auto pointwise = [&](int64_t b0, int64_t b1, int64_t j0, int64_t j1) {
      const auto pass = [&](auto kernel) {
        run_on_cpu_isa<decltype(kernel)>(
            pz + start * 4 * H, pc, pcell + start * H, m_out, slope.data(),
            zoneout_cell ? regs->zc + start * regs->zc_ld : nullptr,
            zoneout_cell ? regs->zc_ld : int64_t{0}, H, b0, b1, j0, j1);
      };
      if (zoneout_cell) {
        pass(ForwardPointwiseRows<T, true>{});
      } else {
        pass(ForwardPointwiseRows<T, false>{});
      }
      if (own_rows) std::memcpy(ph + b0 * Hr, y + b0 * Hr, sizeof(T) * (b1 - b0) * Hr);
    };
    if (recurrent.fuses(bs)) {
      recurrent.fused(0, start, bs, /*accumulate=*/true, pointwise);
    } else {
      recurrent(0, start, bs, /*accumulate=*/true);
      for_rows(bs, bs * H * kPointwiseWeight,
               [&](int64_t b0, int64_t b1) { pointwise(b0, b1, 0, H); });
    }
    if (projection) (*projection)(0, start, bs, /*accumulate=*/false);
    if constexpr (Regs) {
      if (regs->zh) {
        for (int64_t b = 0; b < bs; ++b) {
          const T* dr = regs->zh + (start + b) * regs->zh_ld;
          for (int64_t j = 0; j < Hr; ++j) {
            y[b * Hr + j] = zoneout_mix<T>(dr[j], ph[b * Hr + j], y[b * Hr + j]);
          }
        }
      }
    }
    if (!own_rows) std::memcpy(ph, y, sizeof(T) * bs * Hr);
  }
}

// The reverse recurrence; Regs and regs as in forward_loop. With them, dL/dh_t splits by
// zoneout_hidden into what reaches the plain output (the projection and the gates) and what is
// kept for h_{t-1} (dh_kept); the pointwise pass splits dL/dc_t likewise; dL/dh_{t-1} is then
// (dz W_hh) * recurrent_mask + the kept part, and nothing flows on from a reset row.
template <typename T, bool Regs>
void backward_loop(const StepLayout& L, const LayerDims& d, const T* dy, const at::Tensor& gates,
                   const at::Tensor& cells, const at::Tensor& c0, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, at::Tensor& dz_all, at::Tensor& dh,
                   at::Tensor& dc, at::Tensor& dh_all, at::Tensor& m_all, const StepRegs<T>* regs,
                   const PackSources& sources) {
  const int64_t H = d.H, Hr = d.Hr;
  at::Tensor dm = d.proj ? at::empty({d.B, H}, dh.options()) : dh;
  at::Tensor dh_kept = Regs && regs->zh ? at::empty({d.B, Hr}, dh.options()) : at::Tensor();
  T* pkept = dh_kept.defined() ? dh_kept.data_ptr<T>() : nullptr;
  // dh_{t-1} = dz W_hh and dm = dh W_hr: products with the transposed weights.
  const int64_t steps = static_cast<int64_t>(L.start.size());
  const StepProduct<T> recurrent(w_hh.t(), dz_all, dh, d.B, steps, /*gate_blocks=*/false,
                                 {sources.w_hh, /*transposed=*/true});
  const std::optional<StepProduct<T>> projection =
      d.proj ? std::optional<StepProduct<T>>(std::in_place, w_hr->t(), dh, dm, d.B, steps,
                                             /*gate_blocks=*/false,
                                             PackSource{sources.w_hr, /*transposed=*/true})
             : std::nullopt;
  const T* pact = gates.const_data_ptr<T>();
  const T* pcell = cells.const_data_ptr<T>();
  const T* pc0 = c0.const_data_ptr<T>();
  const T* pdm = dm.const_data_ptr<T>();
  T* pdz = dz_all.data_ptr<T>();
  T* pdh = dh.data_ptr<T>();
  T* pdc = dc.data_ptr<T>();
  T* pdh_all = d.proj ? dh_all.data_ptr<T>() : nullptr;
  T* pm_all = d.proj ? m_all.data_ptr<T>() : nullptr;

  for (int64_t s = static_cast<int64_t>(L.start.size()) - 1; s >= 0; --s) {
    const int64_t start = L.start[s], bs = L.size[s];
    const int64_t prev_start = s > 0 ? L.start[s - 1] : 0, prev_size = s > 0 ? L.size[s - 1] : 0;
    if (dy) {
      const T* dyr = dy + start * Hr;
      for (int64_t k = 0; k < bs * Hr; ++k) pdh[k] += dyr[k];
    }
    if constexpr (Regs) {
      if (regs->zh) {
        for (int64_t b = 0; b < bs; ++b) {
          const T* dr = regs->zh + (start + b) * regs->zh_ld;
          for (int64_t j = 0; j < Hr; ++j) {
            const ZoneoutGrad<T> split = zoneout_grad<T>(dr[j], pdh[b * Hr + j]);
            pdh[b * Hr + j] = split.update;
            pkept[b * Hr + j] = split.prev;
          }
        }
      }
    }
    if (projection) {
      std::memcpy(pdh_all + start * Hr, pdh, sizeof(T) * bs * Hr);
      (*projection)(0, 0, bs, /*accumulate=*/false);
    }
    const auto pointwise = [&](int64_t b0, int64_t b1) {
      if constexpr (Regs) {
        run_on_cpu_isa<BackwardPointwiseRows<T, true>>(
            pact + start * 4 * H, pcell + start * H, pcell + prev_start * H, prev_size, pc0,
            regs->reset ? regs->reset + start : nullptr, regs->zeros,
            regs->zc + start * regs->zc_ld, regs->zc_ld, pdm, pdc, pdz + start * 4 * H,
            pm_all ? pm_all + start * H : nullptr, H, b0, b1);
      } else {
        run_on_cpu_isa<BackwardPointwiseRows<T, false>>(
            pact + start * 4 * H, pcell + start * H, pcell + prev_start * H, prev_size, pc0,
            nullptr, nullptr, nullptr, 0, pdm, pdc, pdz + start * 4 * H,
            pm_all ? pm_all + start * H : nullptr, H, b0, b1);
      }
    };
    // A row's dh_{t-1} needs only its own row of dz: split by rows, each thread runs both.
    if (recurrent.splits_rows(bs)) {
      recurrent.by_rows(bs, [&](int64_t b0, int64_t b1) {
        if (b0 == b1) return;
        pointwise(b0, b1);
        recurrent.panel_rows_of(start, 0, b0, b1, /*accumulate=*/false);
      });
    } else {
      for_rows(bs, bs * H * kPointwiseWeight, pointwise);
      recurrent(start, 0, bs, /*accumulate=*/false);
    }
    if constexpr (Regs) {
      if (regs->mask) {
        for (int64_t k = 0; k < bs * Hr; ++k) pdh[k] *= regs->mask[k];
      }
      if (pkept) {
        for (int64_t k = 0; k < bs * Hr; ++k) pdh[k] += pkept[k];
      }
      if (regs->reset) {
        zero_reset_rows(regs->reset + start, bs, pdh, Hr);
        zero_reset_rows(regs->reset + start, bs, pdc, H);
      }
    }
  }
}

// Where each row's h_{t-1} comes from, for rebuilding H_prev with one gather instead of saving
// it: src[r] >= 0 is a row of the layer's output (the previously visited step, where that batch
// row was active), src[r] < 0 is row -1 - src[r] of h0 (the row's first visited step).
inline std::vector<int64_t> h_prev_sources(const StepLayout& L) {
  std::vector<int64_t> src(static_cast<size_t>(L.rows));
  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t prev_size = s > 0 ? L.size[s - 1] : 0, prev_start = s > 0 ? L.start[s - 1] : 0;
    for (int64_t b = 0; b < L.size[s]; ++b) {
      src[L.start[s] + b] = b < prev_size ? prev_start + b : -1 - b;
    }
  }
  return src;
}

// h_{t-1} of every row, rebuilt from output and h0 rather than saved by the forward (the CUDA
// backward step kernels write theirs as they go).
template <typename T>
void gather_h_prev(const StepLayout& L, int64_t Hr, const T* py, const T* ph0, T* out) {
  const std::vector<int64_t> src = h_prev_sources(L);
  for (int64_t r = 0; r < L.rows; ++r) {
    const T* from = src[r] >= 0 ? py + src[r] * Hr : ph0 + (-1 - src[r]) * Hr;
    std::memcpy(out + r * Hr, from, sizeof(T) * Hr);
  }
}

}  // namespace
}  // namespace fused_lstm

// CPU implementation of fused_lstm::layer_forward / layer_backward.
//
// The input projection, and in the backward the weight and input gradients, are a few large
// ATen GEMMs over the whole sequence. What remains per step is the recurrent product and the
// gate math. For the small LSTMs our users train on long sequences a step costs tens of
// nanoseconds of arithmetic, so the per-step loop runs on raw pointers: no dispatcher call,
// allocation or tensor view. Only when a step's product is big enough for BLAS to pay back the
// call does the loop hand it to ATen (kGemmWork), and only when a step's work pays for waking
// a second thread does it split rows across threads (kParallelWork).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "../lstm_common.h"
#include "../lstm_gates.h"

namespace fused_lstm {
namespace {

// Multiply-adds of one step's recurrent product above which ATen's GEMM beats the loops below.
constexpr int64_t kGemmWork = 1 << 16;
// Multiply-adds (or unit updates x 32) of one step above which rows are split across threads.
constexpr int64_t kParallelWork = 1 << 17;

// out[0:N] += a[0:K] . M (K x N, row-major). Written as K axpys over M's contiguous rows so the
// inner loop vectorises for any N; the small-size replacement for a per-step GEMM.
template <typename T>
inline void vec_mat(const T* __restrict a, const T* __restrict M, int64_t K, int64_t N,
                    T* __restrict out) {
  for (int64_t k = 0; k < K; ++k) {
    const T ak = a[k];
    const T* __restrict row = M + k * N;
    for (int64_t n = 0; n < N; ++n) out[n] += ak * row[n];
  }
}

template <typename F>
inline void for_rows(int64_t rows, int64_t work, const F& f) {
  if (work >= kParallelWork && rows > 1) {
    at::parallel_for(0, rows, 1, f);
  } else {
    f(0, rows);
  }
}

// out rows [0, bs) = a rows [0, bs) @ M^T or += when accumulate; M is (N, K). Picks the loop or
// an ATen GEMM by size. Mt is M transposed and contiguous (K, N), used by the loop.
template <typename T>
void rows_times(const at::Tensor& a, const at::Tensor& M, const T* Mt, int64_t bs, at::Tensor& out,
                bool accumulate) {
  const int64_t K = M.size(1), N = M.size(0);
  if (bs * K * N >= kGemmWork) {
    auto o = out.narrow(0, 0, bs);
    if (accumulate) {
      o.addmm_(a.narrow(0, 0, bs), M.t());
    } else {
      at::mm_out(o, a.narrow(0, 0, bs), M.t());
    }
    return;
  }
  const T* pa = a.const_data_ptr<T>();
  T* po = out.data_ptr<T>();
  for_rows(bs, bs * K * N, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (!accumulate) std::fill_n(po + b * N, N, T(0));
      vec_mat(pa + b * K, Mt, K, N, po + b * N);
    }
  });
}

// The rows of a (rows, N) buffer from `first_row` on, as a view whose data_ptr is that row.
at::Tensor rows_view(const at::Tensor& buf, int64_t first_row) {
  return buf.narrow(0, first_row, buf.size(0) - first_row);
}

template <typename T>
void forward_loop(const StepLayout& L, const LayerDims& d, at::Tensor& gates, at::Tensor& cells,
                  at::Tensor& output, at::Tensor& h, at::Tensor& c, const at::Tensor& w_hh,
                  const std::optional<at::Tensor>& w_hr) {
  const int64_t H = d.H, G = 4 * H, Hr = d.Hr;
  const at::Tensor w_hh_t = w_hh.t().contiguous();
  const at::Tensor w_hr_t = d.proj ? w_hr->t().contiguous() : at::Tensor();
  at::Tensor m = d.proj ? at::empty({d.B, H}, h.options()) : at::Tensor();
  T* pz = gates.data_ptr<T>();
  T* pcell = cells.data_ptr<T>();
  T* py = output.data_ptr<T>();
  T* ph = h.data_ptr<T>();
  T* pc = c.data_ptr<T>();
  T* pm = d.proj ? m.data_ptr<T>() : nullptr;

  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t start = L.start[s], bs = L.size[s];
    at::Tensor z = rows_view(gates, start);
    // z already holds x W_ih^T + b; add h_{t-1} W_hh^T.
    rows_times<T>(h, w_hh, w_hh_t.const_data_ptr<T>(), bs, z, /*accumulate=*/true);
    for_rows(bs, bs * H * 32, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        T* zr = pz + (start + b) * G;
        T* cr = pc + b * H;
        T* cell = pcell + (start + b) * H;
        T* mr = d.proj ? pm + b * H : py + (start + b) * Hr;
        for (int64_t j = 0; j < H; ++j) {
          const auto u = unit_forward<T>(zr[j], zr[H + j], zr[2 * H + j], zr[3 * H + j], cr[j]);
          zr[j] = u.i;
          zr[H + j] = u.f;
          zr[2 * H + j] = u.g;
          zr[3 * H + j] = u.o;
          cr[j] = u.c;
          cell[j] = u.c;
          mr[j] = u.m;
        }
      }
    });
    if (d.proj) {
      at::Tensor y = rows_view(output, start);
      rows_times<T>(m, *w_hr, w_hr_t.const_data_ptr<T>(), bs, y, /*accumulate=*/false);
    }
    std::memcpy(ph, py + start * Hr, sizeof(T) * bs * Hr);
  }
}

// The loops run in float or double; half and bfloat16 storage computes in float.
bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}
std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, bool reverse) {
  const LayerDims d = check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
  if (is_reduced(input)) {
    auto r = layer_forward_cpu(input.to(at::kFloat), batch_sizes, h0.to(at::kFloat),
                               c0.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat),
                               to_float(b_ih), to_float(b_hh), to_float(w_hr), reverse);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
            std::get<3>(r).to(dt), std::get<4>(r).to(dt)};
  }
  const StepLayout L = make_steps(input, batch_sizes, d.B, reverse);
  const at::Tensor x = input.reshape({-1, d.I});
  at::Tensor gates = b_ih ? at::addmm(*b_ih + *b_hh, x, w_ih.t()) : at::mm(x, w_ih.t());
  at::Tensor cells = at::empty({L.rows, d.H}, x.options());
  at::Tensor output = at::empty({L.rows, d.Hr}, x.options());
  at::Tensor h = h0.contiguous().clone();
  at::Tensor c = c0.contiguous().clone();
  const at::Tensor whh = w_hh.contiguous();
  const std::optional<at::Tensor> whr = w_hr ? std::optional(w_hr->contiguous()) : std::nullopt;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_lstm_layer_forward_cpu", [&] {
    forward_loop<scalar_t>(L, d, gates, cells, output, h, c, whh, whr);
  });
  auto lead = input.sizes().vec();
  lead.pop_back();
  auto shaped = [&](const at::Tensor& t) {
    auto s = lead;
    s.push_back(t.size(1));
    return t.view(s);
  };
  return {shaped(output), h, c, shaped(gates), shaped(cells)};
}

template <typename T>
void backward_loop(const StepLayout& L, const LayerDims& d, const T* dy, const at::Tensor& gates,
                   const at::Tensor& cells, const at::Tensor& c0, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, at::Tensor& dz_all, at::Tensor& dh,
                   at::Tensor& dc, at::Tensor& dh_all, at::Tensor& m_all) {
  const int64_t H = d.H, G = 4 * H, Hr = d.Hr;
  const at::Tensor w_hr_c = d.proj ? w_hr->contiguous() : at::Tensor();
  at::Tensor dm = d.proj ? at::empty({d.B, H}, dh.options()) : at::Tensor();
  const T* pact = gates.const_data_ptr<T>();
  const T* pcell = cells.const_data_ptr<T>();
  const T* pc0 = c0.const_data_ptr<T>();
  T* pdz = dz_all.data_ptr<T>();
  T* pdh = dh.data_ptr<T>();
  T* pdc = dc.data_ptr<T>();
  T* pdm = d.proj ? dm.data_ptr<T>() : nullptr;
  T* pdh_all = d.proj ? dh_all.data_ptr<T>() : nullptr;
  T* pm_all = d.proj ? m_all.data_ptr<T>() : nullptr;

  for (int64_t s = static_cast<int64_t>(L.start.size()) - 1; s >= 0; --s) {
    const int64_t start = L.start[s], bs = L.size[s];
    // Rows still active in the previously visited step take c_{t-1} from it, the others from c0.
    const int64_t prev_start = s > 0 ? L.start[s - 1] : 0, prev_size = s > 0 ? L.size[s - 1] : 0;
    if (dy) {
      const T* dyr = dy + start * Hr;
      for (int64_t k = 0; k < bs * Hr; ++k) pdh[k] += dyr[k];
    }
    if (d.proj) {
      std::memcpy(pdh_all + start * Hr, pdh, sizeof(T) * bs * Hr);
      rows_times<T>(dh, w_hr_c.t(), w_hr_c.const_data_ptr<T>(), bs, dm, /*accumulate=*/false);
    }
    const T* pdm_in = d.proj ? pdm : pdh;
    for_rows(bs, bs * H * 32, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t row = start + b;
        const T* a = pact + row * G;
        const T* cell = pcell + row * H;
        const T* c_prev = b < prev_size ? pcell + (prev_start + b) * H : pc0 + b * H;
        const T* dmr = pdm_in + b * H;  // without a projection Hr == H
        T* dcr = pdc + b * H;
        T* dzr = pdz + row * G;
        for (int64_t j = 0; j < H; ++j) {
          const auto u = unit_backward<T>(dmr[j], dcr[j], a[j], a[H + j], a[2 * H + j],
                                          a[3 * H + j], cell[j], c_prev[j]);
          dzr[j] = u.di;
          dzr[H + j] = u.df;
          dzr[2 * H + j] = u.dg;
          dzr[3 * H + j] = u.do_;
          dcr[j] = u.dc_prev;
        }
        if (pm_all) {
          T* mr = pm_all + row * H;
          for (int64_t j = 0; j < H; ++j) mr[j] = unit_m<T>(a[3 * H + j], cell[j]);
        }
      }
    });
    // dh_{t-1} = dz W_hh, i.e. rows of dz times w_hh^T^T: w_hh itself is the loop's (4H, Hr).
    rows_times<T>(rows_view(dz_all, start), w_hh.t(), w_hh.const_data_ptr<T>(), bs, dh,
                  /*accumulate=*/false);
  }
}

// h_{t-1} of every row, rebuilt from output and h0 rather than saved by the forward.
template <typename T>
void gather_h_prev(const StepLayout& L, int64_t Hr, const T* py, const T* ph0, T* out) {
  for (size_t s = 0; s < L.start.size(); ++s) {
    const int64_t prev_size = s > 0 ? L.size[s - 1] : 0, prev_start = s > 0 ? L.start[s - 1] : 0;
    for (int64_t b = 0; b < L.size[s]; ++b) {
      const T* src = b < prev_size ? py + (prev_start + b) * Hr : ph0 + b * Hr;
      std::memcpy(out + (L.start[s] + b) * Hr, src, sizeof(T) * Hr);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
layer_backward_cpu(const std::optional<at::Tensor>& grad_output,
                   const std::optional<at::Tensor>& grad_h_n,
                   const std::optional<at::Tensor>& grad_c_n, const at::Tensor& input,
                   const std::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
                   const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                   const std::optional<at::Tensor>& w_hr, const at::Tensor& output,
                   const at::Tensor& gates, const at::Tensor& cells, bool reverse) {
  const LayerDims d =
      check_layer_args(input, batch_sizes, h0, c0, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  check_grads(grad_output, grad_h_n, grad_c_n, output, h0, c0);
  if (is_reduced(input)) {
    auto r = layer_backward_cpu(to_float(grad_output), to_float(grad_h_n), to_float(grad_c_n),
                                input.to(at::kFloat), batch_sizes, h0.to(at::kFloat),
                                c0.to(at::kFloat), w_ih.to(at::kFloat), w_hh.to(at::kFloat),
                                to_float(w_hr), output.to(at::kFloat), gates.to(at::kFloat),
                                cells.to(at::kFloat), reverse);
    const auto dt = input.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
            std::get<3>(r).to(dt), std::get<4>(r).to(dt), std::get<5>(r).to(dt),
            std::get<6>(r).to(dt)};
  }
  const StepLayout L = make_steps(input, batch_sizes, d.B, reverse);
  const auto opts = input.options();
  const at::Tensor x = input.reshape({-1, d.I});
  const at::Tensor acts = gates.reshape({-1, 4 * d.H}).contiguous();
  const at::Tensor cs = cells.reshape({-1, d.H}).contiguous();
  const at::Tensor y = output.reshape({-1, d.Hr}).contiguous();
  const at::Tensor dy = grad_output ? grad_output->reshape({-1, d.Hr}).contiguous() : at::Tensor();
  at::Tensor dh = grad_h_n ? grad_h_n->contiguous().clone() : at::zeros({d.B, d.Hr}, opts);
  at::Tensor dc = grad_c_n ? grad_c_n->contiguous().clone() : at::zeros({d.B, d.H}, opts);
  at::Tensor dz = at::empty({L.rows, 4 * d.H}, opts);
  at::Tensor h_prev = at::empty({L.rows, d.Hr}, opts);
  at::Tensor dh_all = d.proj ? at::empty({L.rows, d.Hr}, opts) : at::Tensor();
  at::Tensor m_all = d.proj ? at::empty({L.rows, d.H}, opts) : at::Tensor();
  const at::Tensor whh = w_hh.contiguous();
  const at::Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "fused_lstm_layer_backward_cpu", [&] {
    backward_loop<scalar_t>(L, d, dy.defined() ? dy.const_data_ptr<scalar_t>() : nullptr, acts,
                            cs, c0c, whh, w_hr, dz, dh, dc, dh_all, m_all);
    gather_h_prev<scalar_t>(L, d.Hr, y.const_data_ptr<scalar_t>(), h0c.const_data_ptr<scalar_t>(),
                            h_prev.data_ptr<scalar_t>());
  });
  at::Tensor grad_input = at::mm(dz, w_ih).view(input.sizes());
  at::Tensor grad_w_ih = at::mm(dz.t(), x);
  at::Tensor grad_w_hh = at::mm(dz.t(), h_prev);
  at::Tensor grad_bias = dz.sum(0);
  at::Tensor grad_w_hr = d.proj ? at::mm(dh_all.t(), m_all) : at::empty({0}, opts);
  return {grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_lstm, CPU, m) {
  m.impl("layer_forward", &layer_forward_cpu);
  m.impl("layer_backward", &layer_backward_cpu);
}

}  // namespace fused_lstm

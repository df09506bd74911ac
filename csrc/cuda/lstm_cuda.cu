// CUDA implementation of fused_lstm::layer_forward / layer_backward (same semantics as the CPU
// kernels in csrc/cpu/; design in docs/design.md and docs/cuda.md).
//
// Forward: the input projection of all steps is one cuBLAS GEMM into `gates`; then one launch
// per step fuses h_{t-1} W_hh^T with the gate math. Backward: one launch per step fuses
// dh_t = dz_{next} W_hh (+ dy_t, + grad_h_n) with the gate backward, reading the complete dz of
// the step processed before it from global memory (the previous launch), so no per-step GEMM
// launch is needed; weight and input gradients are large GEMMs after the loop.
//
// Steps are sequential, so a kernel only ever reads rows of the previously visited step and
// writes rows of its own: no block can overwrite what another block of the same launch reads.
//
// With a projection (w_hr) the recurrence is through y = m W_hr^T, which needs all of m first,
// so each step adds launches: forward one at::mm (y = m W_hr^T); backward one at::mm
// (dm = dh W_hr) and one pointwise launch for the gate backward (the fused kernel then only
// produces dh). Acceptable for now; a grid-wide barrier (persistent kernel) would remove them.
//
// The regularisers and resets (fused_lstm/_library.py) run in the kernels' kRegs instantiations,
// chosen once per call, so that the default path keeps its launches and arithmetic. They add no
// launches except with both zoneout_hidden and a projection, where the forward mixes h_t after the
// y = m W_hr^T product in one more pointwise launch per step; and the backward's dW_hh operand is
// masked by ATen ops after the loop.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../layer_ops.h"
#include "../lstm_common.h"
#include "../lstm_gates.h"
#include "gpu_runtime.h"
#include "lstm_cuda_thread.h"
#include "step_kernels.cuh"

namespace fused_lstm {
namespace {

using namespace cuda_work;

// ---- host side ------------------------------------------------------------------------------

unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>((n + per_block - 1) / per_block);
}

// Batch rows per block, a compile-time constant so the accumulators stay in registers: small
// batches waste no lanes on empty rows, larger ones reuse each weight load for 8 rows.
template <typename F>
void with_batch_tile(int64_t B, const F& f) {
  if (B <= 1) {
    f(std::integral_constant<int, 1>{});
  } else if (B <= 2) {
    f(std::integral_constant<int, 2>{});
  } else if (B <= 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 8>{});
  }
}

// with_batch_tile, and the kernels' kRegs (whether any regulariser or reset is given) as a
// compile-time constant too, so that the default path is the code it was: f(bt, regs_on).
template <typename F>
void with_tile_and_regs(int64_t B, bool any, const F& f) {
  with_batch_tile(B, [&](auto bt) {
    if (any) {
      f(bt, std::true_type{});
    } else {
      f(bt, std::false_type{});
    }
  });
}

// The regularisers as contiguous tensors, alive for the launches that read them (StepRegs
// points into them); undefined where absent.
struct RegBuffers {
  at::Tensor recurrent_mask, zoneout_cell, zoneout_hidden, reset;

  explicit RegBuffers(const Regularisers& r)
      : recurrent_mask(contiguous(r.recurrent_mask)), zoneout_cell(contiguous(r.zoneout_cell)),
        zoneout_hidden(contiguous(r.zoneout_hidden)), reset(contiguous(r.reset)) {}

  template <typename T>
  StepRegs<T> view() const {
    StepRegs<T> v;
    v.recurrent_mask = recurrent_mask.defined() ? recurrent_mask.const_data_ptr<T>() : nullptr;
    v.reset = reset.defined() ? reset.const_data_ptr<bool>() : nullptr;
    v.zc = zoneout_weight<T>(zoneout_cell);
    v.zh = zoneout_weight<T>(zoneout_hidden);
    return v;
  }

 private:
  static at::Tensor contiguous(const std::optional<at::Tensor>& t) {
    return t ? t->contiguous() : at::Tensor();
  }
  // A 0-dim rate is read through strides 0 (ZoneoutWeight).
  template <typename T>
  static ZoneoutWeight<T> zoneout_weight(const at::Tensor& z) {
    if (!z.defined()) return {};
    const bool rate = z.dim() == 0;
    return {z.const_data_ptr<T>(), rate ? 0 : z.size(-1), rate ? 0 : 1};
  }
};

// The batch row of every row of the sequence, i.e. its index within its step.
std::vector<int64_t> batch_rows(const StepLayout& L) {
  std::vector<int64_t> b(static_cast<size_t>(L.rows));
  for (size_t s = 0; s < L.start.size(); ++s) {
    for (int64_t r = 0; r < L.size[s]; ++r) b[L.start[s] + r] = r;
  }
  return b;
}

// Batch tiles go along gridDim.y, which CUDA caps at 65535 blocks.
void check_batch_fits_grid(int64_t B) {
  constexpr int64_t kMaxBatch = 65535 * 8;
  TORCH_CHECK(B <= kMaxBatch, "fused_lstm: the CUDA kernels take batch sizes up to ", kMaxBatch,
              ", got ", B);
}

// A host index table on the device.
at::Tensor index_to_device(const std::vector<int64_t>& v, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(v.size())},
                              gpu::host_staging().dtype(at::kLong));
  std::copy(v.begin(), v.end(), host.data_ptr<int64_t>());
  return host.to(device, at::kLong, /*non_blocking=*/true);
}

// out (n, width) = rows of a (src >= 0) or b (src < 0) as in gather_offset; a, b contiguous.
at::Tensor gather_rows(const at::Tensor& a, const at::Tensor& b, const std::vector<int64_t>& src,
                       int64_t width) {
  const int64_t n = static_cast<int64_t>(src.size());
  at::Tensor out = at::empty({n, width}, a.options());
  if (n == 0 || width == 0) return out;
  const at::Tensor idx = index_to_device(src, a.device());
  const unsigned grid = std::min<unsigned>(blocks_for(n * width, kThreads), 4096u);
  const gpu::Stream stream = gpu::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "fused_lstm_gather",
                                  [&] {
    FL_LAUNCH(gather_rows_kernel<scalar_t>, grid, kThreads, 0, stream,
              a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
              idx.const_data_ptr<int64_t>(), n, width, out.data_ptr<scalar_t>());
  });
  return out;
}

// The ops compute in their inputs' dtype (the module casts for autocast); without this, an
// enclosing autocast region would recast the ATen GEMMs below (e.g. a float16 input's addmm to
// bfloat16) and the kernels would read buffers of another dtype.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

LayerForwardResult layer_forward(const LayerParams& args) {
  const at::Tensor &input = args.input, &h0 = args.h0, &c0 = args.c0, &w_ih = args.w_ih;
  const at::Tensor& w_hh = args.w_hh;
  const std::optional<at::Tensor> &b_ih = args.b_ih, &b_hh = args.b_hh, &w_hr = args.w_hr;
  const LayerDims& d = args.d;
  const Regularisers& regs = args.regs;
  const StepLayout& L = args.steps;
  gpu::check_device(input);
  check_batch_fits_grid(d.B);
  const gpu::DeviceGuard guard(input.device());
  const NoAutocast no_autocast;
  const RegBuffers reg_buffers(regs);
  const auto opts = input.options();
  const at::Tensor x = input.reshape({-1, d.I});
  // One GEMM for every step's input projection; the step kernels add the recurrent part and
  // overwrite it with the activations.
  at::Tensor gates = b_ih ? at::addmm(*b_ih + *b_hh, x, w_ih.t()) : at::mm(x, w_ih.t());
  gates = gates.contiguous();
  at::Tensor cells = at::empty({L.rows, d.H}, opts);
  at::Tensor output = at::empty({L.rows, d.Hr}, opts);
  const at::Tensor h0c = h0.contiguous();
  const at::Tensor whh = w_hh.contiguous();
  // Rows never visited keep h0 (only possible with no steps at all).
  at::Tensor h_n = h0c.clone();
  // The running cell state stays in the accumulation type across steps.
  at::Tensor c_run = at::empty({d.B, d.H}, opts.dtype(acc_type_of(input.scalar_type())));
  c_run.copy_(c0);
  at::Tensor m = d.proj ? at::empty({d.B, d.H}, opts) : at::Tensor();
  const at::Tensor whr_t = d.proj ? w_hr->t() : at::Tensor();
  const gpu::Stream stream = gpu::current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_lstm_layer_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ForwardStep<scalar_t, acc_t> p{};
    p.w_hh = whh.const_data_ptr<scalar_t>();
    p.h0 = h0c.const_data_ptr<scalar_t>();
    p.gates = gates.data_ptr<scalar_t>();
    p.cells = cells.data_ptr<scalar_t>();
    p.out = output.data_ptr<scalar_t>();
    p.m = d.proj ? m.data_ptr<scalar_t>() : nullptr;
    p.h_n = h_n.data_ptr<scalar_t>();
    p.c_run = c_run.data_ptr<acc_t>();
    p.regs = reg_buffers.view<scalar_t>();
    p.H = d.H;
    p.Hr = d.Hr;
    with_tile_and_regs(d.B, regs.any(), [&](auto bt, auto regs_on) {
      constexpr int BT = decltype(bt)::value;
      constexpr bool kRegs = decltype(regs_on)::value;
      for (size_t s = 0; s < L.start.size(); ++s) {
        p.start = L.start[s];
        p.bs = L.size[s];
        p.prev_start = s > 0 ? L.start[s - 1] : 0;
        p.prev_size = s > 0 ? L.size[s - 1] : 0;
        if (p.bs == 0) continue;  // batch size 0: a launch with an empty grid is an error
        const dim3 grid(blocks_for(d.H, kWarps), blocks_for(p.bs, BT));
        FL_LAUNCH((forward_step_kernel<scalar_t, acc_t, BT, kRegs>), grid, kThreads, 0, stream,
                  p);
        if (d.proj) {
          // Extra launch per step: y = m W_hr^T needs all of m (see the top of the file).
          at::Tensor y = output.narrow(0, p.start, p.bs);
          at::mm_out(y, m.narrow(0, 0, p.bs), whr_t);
          // And zoneout_hidden's mix needs all of y: one more (see the top of the file).
          if (p.regs.zh.on()) {
            FL_LAUNCH((zoneout_hidden_kernel<scalar_t, acc_t>), blocks_for(p.bs * d.Hr, kThreads),
                      kThreads, 0, stream, p);
          }
        }
      }
    });
  });

  if (d.proj && !L.start.empty()) {
    h_n = gather_rows(output, output, last_rows(L, d.B), d.Hr);
  }
  const at::Tensor c_n = c_run.to(input.scalar_type());
  return {shaped_like_input(input, output), h_n, c_n, shaped_like_input(input, gates),
          shaped_like_input(input, cells)};
}

LayerBackwardResult layer_backward(const LayerBackwardParams& args) {
  const at::Tensor &input = args.input, &h0 = args.h0, &c0 = args.c0, &w_ih = args.w_ih;
  const at::Tensor& w_hh = args.w_hh;
  const std::optional<at::Tensor>& w_hr = args.w_hr;
  const std::optional<at::Tensor> &grad_h_n = args.grad_h_n, &grad_c_n = args.grad_c_n;
  const LayerDims& d = args.d;
  const Regularisers& regs = args.regs;
  const StepLayout& L = args.steps;
  gpu::check_device(input);
  check_batch_fits_grid(d.B);
  const gpu::DeviceGuard guard(input.device());
  const NoAutocast no_autocast;
  const RegBuffers reg_buffers(regs);
  const int64_t S = static_cast<int64_t>(L.start.size());
  const auto opts = input.options();
  const FlatSequence seq = flatten_sequence(d, input, args.gates, args.cells, args.output,
                                              args.grad_output);
  const at::Tensor &acts = seq.acts, &cs = seq.cells, &y = seq.y, &dy = seq.dy;
  const at::Tensor ghn = grad_h_n ? grad_h_n->contiguous() : at::Tensor();
  const at::Tensor h0c = h0.contiguous(), c0c = c0.contiguous();
  const at::Tensor whh_t = w_hh.t().contiguous();
  // The running dc stays in the accumulation type across steps (grad_c0 at the end).
  at::Tensor dc_run = at::zeros({d.B, d.H}, opts.dtype(acc_type_of(input.scalar_type())));
  if (grad_c_n) dc_run.copy_(*grad_c_n);
  at::Tensor dh_keep = regs.zoneout_hidden ? at::empty({d.B, d.Hr}, dc_run.options()) : at::Tensor();
  // With steps every row of grad_h0 is written by exactly one launch (see backward_step_kernel);
  // without any, dL/dh0 is grad_h_n itself.
  at::Tensor grad_h0 = S > 0 ? at::empty({d.B, d.Hr}, opts)
                             : (grad_h_n ? ghn.clone() : at::zeros({d.B, d.Hr}, opts));
  at::Tensor dz = at::empty({L.rows, 4 * d.H}, opts);
  at::Tensor dh_all = d.proj ? at::empty({L.rows, d.Hr}, opts) : at::Tensor();
  at::Tensor m_all = d.proj ? at::empty({L.rows, d.H}, opts) : at::Tensor();
  at::Tensor dm = d.proj ? at::empty({d.B, d.H}, opts) : at::Tensor();
  const at::Tensor whr = d.proj ? w_hr->contiguous() : at::Tensor();
  const gpu::Stream stream = gpu::current_stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_lstm_layer_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardStep<scalar_t, acc_t> p{};
    p.w_hh_t = whh_t.const_data_ptr<scalar_t>();
    p.dy = dy.defined() ? dy.const_data_ptr<scalar_t>() : nullptr;
    p.ghn = ghn.defined() ? ghn.const_data_ptr<scalar_t>() : nullptr;
    p.acts = acts.const_data_ptr<scalar_t>();
    p.cells = cs.const_data_ptr<scalar_t>();
    p.c0 = c0c.const_data_ptr<scalar_t>();
    p.dm = d.proj ? dm.const_data_ptr<scalar_t>() : nullptr;
    p.dz = dz.data_ptr<scalar_t>();
    p.dh_all = d.proj ? dh_all.data_ptr<scalar_t>() : nullptr;
    p.m_all = d.proj ? m_all.data_ptr<scalar_t>() : nullptr;
    p.grad_h0 = grad_h0.data_ptr<scalar_t>();
    p.dc_run = dc_run.data_ptr<acc_t>();
    p.dh_keep = dh_keep.defined() ? dh_keep.data_ptr<acc_t>() : nullptr;
    p.regs = reg_buffers.view<scalar_t>();
    p.H = d.H;
    p.Hr = d.Hr;
    with_tile_and_regs(d.B, regs.any(), [&](auto bt, auto regs_on) {
      constexpr int BT = decltype(bt)::value;
      constexpr bool kRegs = decltype(regs_on)::value;
      const auto launch_step = [&]() {
        if (std::max(p.bs, p.next_size) == 0) return;  // batch size 0: nothing to launch
        const dim3 grid(blocks_for(d.Hr, kWarps),
                        blocks_for(std::max(p.bs, p.next_size), BT));
        if (d.proj) {
          FL_LAUNCH((backward_step_kernel<scalar_t, acc_t, BT, false, kRegs>), grid, kThreads, 0,
                    stream, p);
        } else {
          FL_LAUNCH((backward_step_kernel<scalar_t, acc_t, BT, true, kRegs>), grid, kThreads, 0,
                    stream, p);
        }
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
          // Extra launches per step: dm = dh W_hr needs all of dh_t (see the top of the file).
          if (p.bs == 0) continue;
          at::Tensor dm_rows = dm.narrow(0, 0, p.bs);
          at::mm_out(dm_rows, dh_all.narrow(0, p.start, p.bs), whr);
          FL_LAUNCH((backward_unit_kernel<scalar_t, acc_t, kRegs>),
                    blocks_for(p.bs * d.H, kThreads), kThreads, 0, stream, p);
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
  });

  // dW_hh's operand is what entered the recurrent product: the entering state (zero after a
  // reset) times the recurrent mask.
  at::Tensor h_prev = gather_rows(y, h0c, h_prev_sources(L), d.Hr);
  if (reg_buffers.recurrent_mask.defined()) {
    h_prev.mul_(reg_buffers.recurrent_mask.index_select(
        0, index_to_device(batch_rows(L), input.device())));
  }
  if (reg_buffers.reset.defined()) h_prev.masked_fill_(reg_buffers.reset.view({-1, 1}), 0);
  auto [grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] =
      sequence_grads(d, input, seq, w_ih, dz, h_prev, dh_all, m_all);
  return {grad_input, grad_h0, dc_run.to(input.scalar_type()), grad_w_ih, grad_w_hh, grad_bias,
          grad_w_hr};
}

}  // namespace

struct CudaKernels {
  static LayerForwardResult forward(const LayerParams& p) { return layer_forward(p); }
  static LayerBackwardResult backward(const LayerBackwardParams& p) { return layer_backward(p); }
};

// The emulated build (csrc/emulator/lstm_cuda_emulated.cpp) includes this file and exports the
// same entry points to Python instead.
#if !defined(FUSED_LSTM_EMULATED)
TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) { register_layer_ops<CudaKernels>(m); }
#endif

}  // namespace fused_lstm

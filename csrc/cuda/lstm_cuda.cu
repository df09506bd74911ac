// CUDA implementation of fused_lstm::layer_forward / layer_backward (same semantics as the CPU
// kernels in csrc/cpu/; design in docs/design.md and docs/cuda.md): the checks, the buffers and
// the GEMMs around the recurrence. The recurrence itself, one kernel launch per step, is
// step_loops.cuh's, compiled per dtype and direction in instances/.
//
// Forward: the input projection of all steps is one cuBLAS GEMM into `gates`; then one launch
// per step fuses h_{t-1} W_hh^T with the gate math. Backward: one launch per step fuses
// dh_t = dz_{next} W_hh (+ dy_t, + grad_h_n) with the gate backward, reading the complete dz of
// the step processed before it from global memory (the previous launch), and writes the h_{t-1}
// that entered each step for dW_hh; weight and input gradients are large GEMMs after the loop.
//
// Steps are sequential, so a kernel only ever reads rows of the previously visited step and
// writes rows of its own: no block can overwrite what another block of the same launch reads.
// Nothing is copied from the host per call, so a call can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../layer_ops.h"
#include "../lstm_common.h"
#include "gpu_runtime.h"
#include "step_loops.h"

namespace fused_lstm {
namespace {

using cuda_steps::RegBuffers;

// Batch tiles go along gridDim.y, which CUDA caps at 65535 blocks.
void check_batch_fits_grid(int64_t B) {
  constexpr int64_t kMaxBatch = 65535 * 8;
  TORCH_CHECK(B <= kMaxBatch, "fused_lstm: the CUDA kernels take batch sizes up to ", kMaxBatch,
              ", got ", B);
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
  const cuda_steps::ForwardBuffers bufs{d, L, reg_buffers, whh, h0c, gates, cells, output, h_n,
                                        c_run, m, whr_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_lstm_layer_forward_cuda",
                                  [&] { cuda_steps::forward_steps<scalar_t>(bufs); });
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
  // dW_hh's operand, written by the step kernels: the entering state (zero after a reset) times
  // the recurrent mask.
  at::Tensor h_prev = at::empty({L.rows, d.Hr}, opts);
  const cuda_steps::BackwardBuffers bufs{
      d,  L,      reg_buffers, whh_t, dy,  ghn,     acts,   cs,     c0c,    y,
      h0c, dz,    dh_all,      m_all, dm,  whr,     grad_h0, h_prev, dc_run, dh_keep};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "fused_lstm_layer_backward_cuda",
                                  [&] { cuda_steps::backward_steps<scalar_t>(bufs); });
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

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

#include "../layer_buffers.h"
#include "../layer_ops.h"
#include "gpu_runtime.h"
#include "step_loops.h"

namespace fused_lstm {
namespace {

// Batch tiles go along gridDim.y, which CUDA caps at 65535 blocks; the kernels with the
// smallest largest tile take kMaxBatchTile rows a block.
void check_batch_fits_grid(int64_t B) {
  constexpr int64_t kMaxBatch = int64_t{65535} * cuda_steps::kMaxBatchTile;
  TORCH_CHECK(B <= kMaxBatch, "fused_lstm: the CUDA kernels take batch sizes up to ", kMaxBatch,
              ", got ", B);
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// sequence_grads' products (layer_buffers.h): cuBLAS takes either orientation at the same speed.
struct CublasProducts {
  static at::Tensor grad_input(const at::Tensor& dz, const at::Tensor& w_ih) {
    return at::mm(dz, w_ih);
  }
  static at::Tensor weight(const at::Tensor& d, const at::Tensor& v) { return at::mm(d.t(), v); }
};

LayerForwardResult layer_forward(const LayerParams& p) {
  const LayerDims& d = p.d;
  gpu::check_device(p.input);
  check_batch_fits_grid(d.B);
  const gpu::DeviceGuard guard(p.input.device());
  const auto opts = p.input.options();
  const at::Tensor x = p.input.reshape({-1, d.I});
  // One GEMM for every step's input projection; the step kernels add the recurrent part and
  // overwrite it with the activations.
  at::Tensor gates = p.b_ih ? at::addmm(*p.b_ih + *p.b_hh, x, p.w_ih.t()) : at::mm(x, p.w_ih.t());
  const at::Tensor h0 = p.h0.contiguous();
  // The running cell state stays in the accumulation type across steps.
  at::Tensor c_run = at::empty({d.B, d.H}, opts.dtype(acc_type_of(p.input.scalar_type())));
  c_run.copy_(p.c0);
  const cuda_steps::ForwardBuffers bufs{
      .p = p,
      .w_hh = cuda_steps::vector_rows(p.w_hh),
      .h0 = cuda_steps::vector_rows(h0),
      .gates = gates.contiguous(),
      .cells = at::empty({p.steps.rows, d.H}, opts),
      .output = cuda_steps::vector_buffer(p.steps.rows, d.Hr, opts),
      // Rows never visited keep h0 (only possible with no steps at all).
      .h_n = h0.clone(),
      .c_run = c_run,
      .m = d.proj ? at::empty({d.B, d.H}, opts) : at::Tensor(),
      .whr_t = d.proj ? p.w_hr->t() : at::Tensor(),
      .recurrent_mask =
          p.regs.recurrent_mask ? cuda_steps::vector_rows(*p.regs.recurrent_mask) : at::Tensor()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "fused_lstm_layer_forward_cuda",
                                  [&] { cuda_steps::forward_steps<scalar_t>(bufs); });
  // Without its rows' padding (a copy only where Hr is not a whole number of vectors).
  const at::Tensor output = bufs.output.narrow(1, 0, d.Hr).contiguous();
  return {shaped_like_input(p.input, output), bufs.h_n, c_run.to(p.input.scalar_type()),
          shaped_like_input(p.input, bufs.gates), shaped_like_input(p.input, bufs.cells)};
}

LayerBackwardResult layer_backward(const LayerBackwardParams& p) {
  const LayerDims& d = p.d;
  const StepLayout& L = p.steps;
  gpu::check_device(p.input);
  check_batch_fits_grid(d.B);
  const gpu::DeviceGuard guard(p.input.device());
  const int64_t S = static_cast<int64_t>(L.start.size());
  const auto opts = p.input.options();
  const FlatSequence seq = flatten_sequence(p);
  const at::Tensor ghn = p.grad_h_n ? p.grad_h_n->contiguous() : at::Tensor();
  // The running dc stays in the accumulation type across steps (grad_c0 at the end).
  at::Tensor dc_run = at::zeros({d.B, d.H}, opts.dtype(acc_type_of(p.input.scalar_type())));
  if (p.grad_c_n) dc_run.copy_(*p.grad_c_n);
  const cuda_steps::BackwardBuffers bufs{
      .p = p,
      .w_hh_t = cuda_steps::vector_rows(p.w_hh.t()),
      .dy = seq.dy,
      .ghn = ghn,
      .acts = seq.acts,
      .cells = seq.cells,
      .c0 = p.c0.contiguous(),
      .y = seq.y,
      .h0 = p.h0.contiguous(),
      .dz = cuda_steps::vector_buffer(L.rows, 4 * d.H, opts),
      .dh_all = d.proj ? at::empty({L.rows, d.Hr}, opts) : at::Tensor(),
      .m_all = d.proj ? at::empty({L.rows, d.H}, opts) : at::Tensor(),
      .dm = d.proj ? at::empty({d.B, d.H}, opts) : at::Tensor(),
      .whr = d.proj ? p.w_hr->contiguous() : at::Tensor(),
      // With steps every row of grad_h0 is written by exactly one launch (see
      // backward_step_kernel); without any, dL/dh0 is grad_h_n itself.
      .grad_h0 = S > 0 ? at::empty({d.B, d.Hr}, opts)
                       : (p.grad_h_n ? ghn.clone() : at::zeros({d.B, d.Hr}, opts)),
      // dW_hh's operand, written by the step kernels: the entering state (zero after a reset)
      // times the recurrent mask.
      .h_prev = at::empty({L.rows, d.Hr}, opts),
      .dc_run = dc_run,
      .dh_keep = p.regs.zoneout_hidden ? at::empty({d.B, d.Hr}, dc_run.options()) : at::Tensor()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(),
                                  "fused_lstm_layer_backward_cuda",
                                  [&] { cuda_steps::backward_steps<scalar_t>(bufs); });
  auto [grad_input, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr] = sequence_grads<CublasProducts>(
      p, seq, bufs.dz.narrow(1, 0, 4 * d.H), bufs.h_prev, bufs.dh_all, bufs.m_all);
  return {grad_input, bufs.grad_h0, dc_run.to(p.input.scalar_type()), grad_w_ih, grad_w_hh,
          grad_bias,  grad_w_hr};
}

}  // namespace

struct CudaKernels {
  static LayerForwardResult forward(const LayerParams& p) { return layer_forward(p); }
  static LayerBackwardResult backward(const LayerBackwardParams& p) { return layer_backward(p); }
};

// The emulated build (csrc/emulator/lstm_cuda_emulated.cpp) includes this file and registers the
// same kernels for its own namespace instead.
#if !defined(FUSED_LSTM_EMULATED)
TORCH_LIBRARY_IMPL(fused_lstm, CUDA, m) { register_layer_ops<CudaKernels>(m); }
#endif

}  // namespace fused_lstm

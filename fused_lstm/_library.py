"""Python-side registrations for the native ops declared in csrc/ops.cpp.

Fake (meta) implementations, so torch.compile and FakeTensor can trace the ops without running a
kernel, and autograd for ``layer_forward`` and ``cell_forward`` (their backwards are
``layer_backward`` and ``cell_backward``), so the ops are differentiable on their own too, not
only through :class:`fused_lstm.LSTMLayerFunction` and :class:`fused_lstm.LSTMCellFunction`; the
two backward ops are registered as non-differentiable (no double backward)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._double_backward import DOUBLE_BACKWARD_ERROR, refuse_double_backward


def _check_devices(input: Tensor, **tensors: Tensor | None) -> None:
    # The dispatcher sends a call whose tensors mix the meta device with a real one here, to
    # the fake kernel, rather than to a device kernel whose check_layer_args would refuse it.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"fused_lstm: {name} must be on the device of input "
                               f"({input.device}), got {t.device}")


def register() -> None:
    @torch.library.register_fake("fused_lstm::layer_forward")
    def _(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
        _check_devices(input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
        H, Hr = w_hh.shape[0] // 4, w_hh.shape[1]
        lead = input.shape[:-1]
        return (input.new_empty(*lead, Hr), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                input.new_empty(*lead, 4 * H), input.new_empty(*lead, H))

    @torch.library.register_fake("fused_lstm::layer_backward")
    def _(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
          output, gates, cells, reverse):
        _check_devices(input, grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n,
                       h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, output=output,
                       gates=gates, cells=cells)
        grad_w_hr: Tensor = w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty(0)
        return (input.new_empty(input.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
                w_hh.new_empty(w_hh.shape[0]), grad_w_hr)

    def setup_context(ctx, inputs, output):
        input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, _, w_hr, reverse = inputs
        y, _, _, gates, cells = output
        ctx.set_materialize_grads(False)
        # The workspace is saved state for the backward, not a differentiable result.
        ctx.mark_non_differentiable(gates, cells)
        ctx.batch_sizes, ctx.reverse, ctx.has_bias = batch_sizes, reverse, b_ih is not None
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, w_hr, y, gates, cells)

    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        saved = ctx.saved_tensors
        input, h0, c0, w_ih, w_hh, w_hr, y, gates, cells = saved
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = refuse_double_backward(
            torch.ops.fused_lstm.layer_backward(
                grad_y, grad_h_n, grad_c_n, input, ctx.batch_sizes, h0, c0, w_ih, w_hh, w_hr, y,
                gates, cells, ctx.reverse),
            (grad_y, grad_h_n, grad_c_n, *saved))
        bias = (db, db) if ctx.has_bias else (None, None)
        return dx, None, dh0, dc0, dw_ih, dw_hh, *bias, dw_hr if w_hr is not None else None, None

    torch.library.register_autograd("fused_lstm::layer_forward", backward,
                                    setup_context=setup_context)

    @torch.library.register_fake("fused_lstm::cell_forward")
    def _(input, h0, c0, w_ih, w_hh, b_ih, b_hh):
        _check_devices(input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        return (h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                input.new_empty(input.shape[0], w_hh.shape[0]), c0.new_empty(c0.shape))

    @torch.library.register_fake("fused_lstm::cell_backward")
    def _(grad_h, grad_c, input, h0, c0, w_ih, w_hh, gates, cells):
        _check_devices(input, grad_h=grad_h, grad_c=grad_c, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh,
                       gates=gates, cells=cells)
        return (input.new_empty(input.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
                w_hh.new_empty(w_hh.shape[0]))

    def cell_setup_context(ctx, inputs, output):
        input, h0, c0, w_ih, w_hh, b_ih, _ = inputs
        _, _, gates, cells = output
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(gates, cells)
        ctx.has_bias = b_ih is not None
        # In the order of cell_backward's arguments after the incoming gradients.
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, gates, cells)

    def cell_backward(ctx, grad_h, grad_c, _grad_gates, _grad_cells):
        saved = ctx.saved_tensors
        dx, dh0, dc0, dw_ih, dw_hh, db = refuse_double_backward(
            torch.ops.fused_lstm.cell_backward(grad_h, grad_c, *saved), (grad_h, grad_c, *saved))
        bias = (db, db) if ctx.has_bias else (None, None)
        return dx, dh0, dc0, dw_ih, dw_hh, *bias

    torch.library.register_autograd("fused_lstm::cell_forward", cell_backward,
                                    setup_context=cell_setup_context)

    # The backward ops are declared non-differentiable: their results carry no graph, and their
    # callers (the autograd of the forward ops above, LSTMLayerFunction, LSTMCellFunction) attach
    # the double-backward error to them instead. Without an autograd kernel of its own, autograd's
    # fallback would give their results a graph whose backward only warns and returns zeros.
    def backward_is_not_differentiable(ctx, inputs, output):
        ctx.mark_non_differentiable(*output)

    def never_called(ctx, *grads):  # every output is non-differentiable
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    for op in ("fused_lstm::layer_backward", "fused_lstm::cell_backward"):
        torch.library.register_autograd(op, never_called,
                                        setup_context=backward_is_not_differentiable)

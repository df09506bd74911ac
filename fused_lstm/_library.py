"""Python-side registrations for the ops declared in csrc/ops.cpp (their autograd is C++, in
csrc/autograd/).

Fake (meta) implementations of every op, so torch.compile and FakeTensor can trace them without
running a kernel; and the pure-PyTorch reference (:mod:`fused_lstm.reference`, the same
signatures) as the ``CompositeExplicitAutograd`` kernel of the four kernel ops, so that a device
without a native kernel runs the reference through the same ops and the same autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference

KERNEL_OPS = ("layer_forward", "layer_backward", "cell_forward", "cell_backward")


def _check_devices(input: Tensor, **tensors: Tensor | None) -> None:
    # The dispatcher sends a call whose tensors mix the meta device with a real one here, to
    # the fake kernel, rather than to a device kernel whose check_layer_args would refuse it.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(f"fused_lstm: {name} must be on the device of input "
                               f"({input.device}), got {t.device}")


def register() -> None:
    @torch.library.register_fake("fused_lstm::layer_forward")
    def _(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, recurrent_mask=None,
          zoneout_cell=None, zoneout_hidden=None, reset=None):
        _check_devices(input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=w_hr,
                       recurrent_mask=recurrent_mask, zoneout_cell=zoneout_cell,
                       zoneout_hidden=zoneout_hidden, reset=reset)
        H, Hr = w_hh.shape[0] // 4, w_hh.shape[1]
        lead = input.shape[:-1]
        return (input.new_empty(*lead, Hr), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                input.new_empty(*lead, 4 * H), input.new_empty(*lead, H))

    @torch.library.register_fake("fused_lstm::layer_backward")
    def _(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
          output, gates, cells, reverse, recurrent_mask=None, zoneout_cell=None,
          zoneout_hidden=None, reset=None):
        _check_devices(input, grad_output=grad_output, grad_h_n=grad_h_n, grad_c_n=grad_c_n,
                       h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, w_hr=w_hr, output=output,
                       gates=gates, cells=cells, recurrent_mask=recurrent_mask,
                       zoneout_cell=zoneout_cell, zoneout_hidden=zoneout_hidden, reset=reset)
        grad_w_hr: Tensor = w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty(0)
        return (input.new_empty(input.shape), h0.new_empty(h0.shape), c0.new_empty(c0.shape),
                w_ih.new_empty(w_ih.shape), w_hh.new_empty(w_hh.shape),
                w_hh.new_empty(w_hh.shape[0]), grad_w_hr)

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

    @torch.library.register_fake("fused_lstm::lstm")
    def _(input, batch_sizes, hx, cx, params, has_biases, has_proj, num_layers, dropout, train,
          bidirectional, *, reset=None, recurrent_dropout=0.0, zoneout_cell=0.0,
          zoneout_hidden=0.0, weight_drop=0.0):
        _check_devices(input, hx=hx, cx=cx, reset=reset,
                       **{f"params[{k}]": p for k, p in enumerate(params)})
        D = 2 if bidirectional else 1
        return (input.new_empty(*input.shape[:-1], D * hx.shape[-1]), hx.new_empty(hx.shape),
                cx.new_empty(cx.shape))

    @torch.library.register_fake("fused_lstm::keep_mask")
    def _(like, size, prob, value):
        return like.new_empty(size)

    for name in KERNEL_OPS:
        torch.library.impl(f"fused_lstm::{name}", "CompositeExplicitAutograd")(
            getattr(reference, name))

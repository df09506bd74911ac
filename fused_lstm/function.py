"""The autograd boundary: one LSTM layer, both directions, or one cell step, with the
handwritten backward.

The forward saves only the workspace the kernels write (gate activations and cell states), not
autograd's per-op tape. Each direction or step runs through ``torch.ops.fused_lstm`` when this
install has a native kernel for the tensors' device, and through :mod:`fused_lstm.reference`
otherwise; the two have the same functions with the same signatures, so the choice is one lookup.
"""

from __future__ import annotations

import contextvars

import torch
from torch import Tensor

from . import _backend, reference
from ._double_backward import refuse_double_backward


def _ops(device: torch.device):
    """Where the ops for tensors on ``device`` come from: ``torch.ops.fused_lstm`` or the
    reference module, either one read as ``ops.layer_forward``, ``ops.cell_backward``..."""
    return torch.ops.fused_lstm if _backend.has_native(device.type) else reference


# While fused_lstm.gate_trace runs a module, every layer forward appends its per-direction
# workspace here, so the trace is what the kernels computed, not a recomputation.
workspace_tap: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "fused_lstm_workspace_tap", default=None)


def split_direction_weights(weights: tuple[Tensor, ...], has_bias: bool, has_proj: bool):
    """nn.LSTM's per-direction order [w_ih, w_hh, (b_ih, b_hh), (w_hr)] -> (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_bias else (None, None)
    w_hr = weights[-1] if has_proj else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


class LSTMLayerFunction(torch.autograd.Function):
    """One layer. ``h0 (D, B, Hr)``, ``c0 (D, B, H)``; ``weights`` is nn.LSTM's flat list for
    this layer's D directions. Returns ``output (…, D*Hr)``, ``h_n (D, B, Hr)``, ``c_n (D, B, H)``."""

    @staticmethod
    def forward(ctx, input, batch_sizes, h0, c0, num_directions, has_bias, has_proj, *weights):
        fwd = _ops(input.device).layer_forward
        per_dir = len(weights) // num_directions
        outs, h_n, c_n, saved = [], [], [], []
        for d in range(num_directions):
            w_ih, w_hh, b_ih, b_hh, w_hr = split_direction_weights(
                weights[d * per_dir:(d + 1) * per_dir], has_bias, has_proj)
            y, h, c, gates, cells = fwd(
                input, batch_sizes, h0[d], c0[d], w_ih, w_hh, b_ih, b_hh, w_hr, d == 1)
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
            saved += [y, gates, cells]
        tap = workspace_tap.get()
        if tap is not None:
            tap.append((saved, has_proj))
        # An unused output (only h_n taken, say) reaches backward as None, not a zero tensor.
        ctx.set_materialize_grads(False)
        ctx.num_directions, ctx.has_bias, ctx.has_proj = num_directions, has_bias, has_proj
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(input, h0, c0, *weights, *saved)
        output = outs[0] if num_directions == 1 else torch.cat(outs, dim=-1)
        return output, torch.stack(h_n), torch.stack(c_n)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        saved_tensors = ctx.saved_tensors
        with torch.no_grad():
            grads = LSTMLayerFunction._grads(ctx, saved_tensors, grad_output, grad_h_n, grad_c_n)
        return refuse_double_backward(grads, (grad_output, grad_h_n, grad_c_n, *saved_tensors))

    @staticmethod
    def _grads(ctx, saved_tensors, grad_output, grad_h_n, grad_c_n):
        D = ctx.num_directions
        input, h0, c0, *rest = saved_tensors
        weights, saved = rest[:len(rest) - 3 * D], rest[len(rest) - 3 * D:]
        per_dir = len(weights) // D
        bwd = _ops(input.device).layer_backward
        Hr = h0.shape[-1]

        grad_input = None
        grad_h0, grad_c0, grad_weights = [], [], []
        for d in range(D):
            w_ih, w_hh, _, _, w_hr = split_direction_weights(
                weights[d * per_dir:(d + 1) * per_dir], ctx.has_bias, ctx.has_proj)
            y, gates, cells = saved[3 * d:3 * d + 3]
            dy = None
            if grad_output is not None:
                dy = grad_output if D == 1 else grad_output[..., d * Hr:(d + 1) * Hr]
            dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = bwd(
                dy, None if grad_h_n is None else grad_h_n[d],
                None if grad_c_n is None else grad_c_n[d],
                input, ctx.batch_sizes, h0[d], c0[d], w_ih, w_hh, w_hr, y, gates, cells, d == 1)
            grad_input = dx if grad_input is None else grad_input + dx
            grad_h0.append(dh0)
            grad_c0.append(dc0)
            grad_weights += [dw_ih, dw_hh]
            if ctx.has_bias:
                grad_weights += [db, db]
            if ctx.has_proj:
                grad_weights.append(dw_hr)
        return (grad_input, None, torch.stack(grad_h0), torch.stack(grad_c0), None, None, None,
                *grad_weights)


class LSTMCellFunction(torch.autograd.Function):
    """One step of nn.LSTMCell. ``input (B, I)``, ``h0``, ``c0 (B, H)``, the weights ``w_ih``,
    ``w_hh`` and the biases ``b_ih``, ``b_hh`` or none. Returns ``h``, ``c`` (B, H)."""

    @staticmethod
    def forward(ctx, input, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None):
        h, c, gates, cells = _ops(input.device).cell_forward(input, h0, c0, w_ih, w_hh, b_ih,
                                                             b_hh)
        ctx.set_materialize_grads(False)
        ctx.has_bias = b_ih is not None
        # In the order of cell_backward's arguments after the incoming gradients.
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, gates, cells)
        return h, c

    @staticmethod
    def backward(ctx, grad_h, grad_c):
        saved = ctx.saved_tensors
        with torch.no_grad():
            dx, dh0, dc0, dw_ih, dw_hh, db = _ops(saved[0].device).cell_backward(
                grad_h, grad_c, *saved)
        bias = (db, db) if ctx.has_bias else (None, None)
        return refuse_double_backward((dx, dh0, dc0, dw_ih, dw_hh, *bias),
                                      (grad_h, grad_c, *saved))

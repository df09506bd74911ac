"""Double backward is refused, loudly, rather than computed wrong.

The handwritten backward treats the saved gate activations as constants, so differentiating its
result would give silently wrong second derivatives. Every place that runs it (the layer's and
the cell's autograd.Functions, the autograd registered for the ``layer_forward`` and
``cell_forward`` ops) passes its gradients through :func:`refuse_double_backward`.
"""

from __future__ import annotations

import torch

DOUBLE_BACKWARD_ERROR = (
    "fused_lstm: double backward is not supported (differentiating gradients that were computed "
    "with create_graph=True through FusedLSTM, FusedLSTMCell, fused_lstm::layer_forward or "
    "fused_lstm::cell_forward)")


class _RefuseDoubleBackward(torch.autograd.Function):
    """The identity on a layer's gradients, with a backward that raises.

    torch's ``once_differentiable`` is not enough: its error node hangs off detached copies, so
    ``torch.autograd.grad(..., allow_unused=True)`` returns None (read: zero) instead of raising.
    Here the gradients stay attached to everything they were computed from, so any second
    backward that reaches them raises.
    """

    @staticmethod
    def forward(ctx, num_grads, *tensors):
        return tuple(t.clone() for t in tensors[:num_grads])

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def refuse_double_backward(grads, sources):
    """``grads`` as they are in a plain backward; under ``create_graph=True``, joined to
    ``sources`` (the incoming gradients and saved tensors) by :class:`_RefuseDoubleBackward`."""
    sources = [s for s in sources if s is not None and s.requires_grad]
    if not torch.is_grad_enabled() or not sources:
        return grads
    present = [g for g in grads if g is not None]
    joined = iter(_RefuseDoubleBackward.apply(len(present), *present, *sources))
    return tuple(None if g is None else next(joined) for g in grads)

"""gate_trace: the gate activations and states of every step, as the forward kernels saved them.

The lectures draw i, f, g, o, c and h step by step to show why an LSTM remembers. The fused
forward already writes the gate activations and cell states into the workspace it keeps for the
backward, so the trace is that workspace, reshaped, rather than a second implementation of the
cell in Python that could disagree with the kernels: gate_trace runs the module and, through
``fused_lstm._redirect``, keeps what each of the ``lstm`` op's ``layer_forward`` calls returns.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from . import _redirect
from .modules import FusedLSTM

GATES = ("i", "f", "g", "o")


def gate_trace(
    module: FusedLSTM | nn.LSTM,
    input: Tensor | PackedSequence,
    hx: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Run ``module`` forward on ``input`` (and ``hx``) without autograd and return the traces.

    Returns a dict with keys ``"i"``, ``"f"``, ``"g"``, ``"o"`` (gate activations), ``"c"`` (cell
    state) and ``"h"`` (hidden state ``o * tanh(c)``, before any projection), each of shape
    ``(num_layers * num_directions, T, B, hidden_size)``, time-major whatever ``batch_first``
    says; ``(num_layers * num_directions, T, hidden_size)`` for unbatched input. Rows are ordered
    like nn.LSTM's ``h_n``: layer by layer, forward direction first. For a PackedSequence, B is
    the original batch order and steps past a sequence's end are zero.

    ``module`` is a FusedLSTM, or an nn.LSTM (traced through a FusedLSTM copy of its weights).
    The module runs as it is: in training mode, inter-layer dropout is applied.
    """
    if isinstance(module, nn.LSTM):
        module = FusedLSTM.from_lstm(module)
    if not isinstance(module, FusedLSTM):
        raise TypeError(
            f"gate_trace expects a FusedLSTM or nn.LSTM module, got {type(module).__name__}"
        )
    H = module.hidden_size
    traces: dict[str, list[Tensor]] = {k: [] for k in (*GATES, "c", "h")}

    def tap(*args):
        # Each layer and direction's kernel call, in h_n's order: keep what it returned.
        y, h, c, gates, cells = torch.ops.fused_lstm.layer_forward(*args)
        acts = gates.unflatten(-1, (4, H)).unbind(-2)
        for name, act in zip(GATES, acts):
            traces[name].append(act)
        traces["c"].append(cells)
        # Without a projection the layer output is h itself; with one, h is the pre-projection
        # o * tanh(c), which the workspace holds the factors of.
        traces["h"].append(acts[3] * cells.tanh() if module.proj_size else y)
        return y, h, c, gates, cells

    with (
        torch.no_grad(),
        _redirect.redirect({"fused_lstm::layer_forward": tap}, applies=lambda args: True),
    ):
        module(input, hx)

    packed = isinstance(input, PackedSequence)
    unbatched = not packed and input.dim() == 2
    result = {}
    for name, per_layer in traces.items():
        stacked = torch.stack(per_layer)  # (L*D, T, B, H), (L*D, N, H) packed
        if packed:
            stacked = torch.stack(
                [pad_packed_sequence(PackedSequence(t, *input[1:]))[0] for t in stacked.unbind(0)]
            )
        elif unbatched:
            stacked = stacked.squeeze(2)
        result[name] = stacked
    return result

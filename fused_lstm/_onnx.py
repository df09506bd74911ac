"""What FusedLSTM and FusedLSTMCell run under ``torch.onnx.export``: ONNX's own ``LSTM`` operator.

Neither ONNX exporter can convert the fused ops, and ONNX has an operator for exactly this
layer, the one nn.LSTM exports to and runtimes optimise. So while an export traces the modules
(``torch.onnx.is_in_onnx_export()``, true under both exporters), they call :func:`lstm` and
:func:`lstm_cell` here instead of the fused ops: plain PyTorch ops around one ``LSTM`` node per
layer. Nothing is registered with the exporters and the user passes nothing extra. Each exporter
gets the node its own way:

- the TorchScript-based exporter (``dynamo=False``) traces with ``torch.jit``: the layer calls
  ``torch._VF.lstm``, nn.LSTM's own op, which that exporter turns into ``LSTM`` (dynamic axes
  work);
- the default exporter (``dynamo=True``) runs torch.export, where ``aten::lstm`` would fix the
  sequence length (nn.LSTM's graph then fails in onnxruntime at any other length), so the layer
  emits the ``LSTM`` node itself through ``torch.onnx.ops.symbolic_multi_out``, whose output
  shapes stay symbolic.

``proj_size`` has no ``LSTM`` form (nn.LSTM cannot export it), but the recurrence stays an
``LSTM`` over the unprojected state ``m`` (``h = W_hr m``): ``W_hh h_{t-1} = (W_hh W_hr)
m_{t-1}``, so the node's recurrent weight is ``W_hh W_hr``. Its first step would need an ``m_0``
with ``W_hr m_0 = h_0``, which need not exist; instead ``m_0 = 0`` and ``W_hh h_0`` enters through
the input: each direction's input gets ``P`` extra features, ``h_0`` at the direction's first
step and zero elsewhere, with ``W_hh`` as their input weights. The outputs and ``h_n`` are then
projected by ``W_hr``. Exact, for any sequence length and batch, still one ``LSTM`` node a layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def exporting() -> bool:
    """``torch.onnx.is_in_onnx_export()``, cheaply outside an export. That function imports two
    modules at every call, 2.5 us here, a sixth of a FusedLSTMCell step; but each exporter traces
    the module under a flag that costs nothing to read: torch.jit.trace (``dynamo=False``) or
    torch.export (``dynamo=True``)."""
    return (
        torch.jit.is_tracing() or torch.compiler.is_exporting()
    ) and torch.onnx.is_in_onnx_export()


# PyTorch stacks the gates' rows as i, f, g, o; ONNX's LSTM as i, o, f, g (its "c").
_ONNX_GATE_ORDER = [0, 3, 1, 2]


# A PackedSequence's batch sizes are data that the graph would have to index with; torch.export
# cannot even read batch_sizes[0]. FusedLSTM.forward raises this before it tries.
PACKED_SEQUENCE_ERROR = (
    "fused_lstm: torch.onnx.export of FusedLSTM with a PackedSequence input is not supported; "
    "export the model with a padded tensor input instead"
)
REGULARISER_ERROR = (
    "fused_lstm: torch.onnx.export of FusedLSTM with reset or zoneout (or, in training mode, "
    "recurrent_dropout or weight_drop) is not supported: ONNX's LSTM has no such inputs; export "
    "in eval mode with zoneout=0 and no reset"
)


def split_direction_weights(weights, has_bias: bool, has_proj: bool):
    """One direction's slice of nn.LSTM's flat weights, ``[w_ih, w_hh, (b_ih, b_hh), (w_hr)]``,
    as the layer functions take them: ``(w_ih, w_hh, b_ih, b_hh, w_hr)``, None where absent."""
    w_ih, w_hh = weights[0], weights[1]
    b_ih, b_hh = (weights[2], weights[3]) if has_bias else (None, None)
    w_hr = weights[-1] if has_proj else None
    return w_ih, w_hh, b_ih, b_hh, w_hr


def lstm(
    input: Tensor,
    batch_sizes: Tensor | None,
    hx: Tensor,
    cx: Tensor,
    params: list[Tensor],
    has_biases: bool,
    has_proj: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``fused_lstm::lstm`` op for export, with its signature: ``input`` time-major
    ``(T, B, I)``, ``hx``, ``cx`` and ``params`` as nn.LSTM's (``_flat_weights`` order).
    ``batch_sizes`` is always None: FusedLSTM refuses a PackedSequence at export.
    Returns ``(output, h_n, c_n)``."""
    num_directions = 2 if bidirectional else 1
    per_dir = len(params) // (num_layers * num_directions)
    x, h_n, c_n = input, [], []
    for layer in range(num_layers):
        lo, hi = layer * num_directions, (layer + 1) * num_directions
        directions = [
            split_direction_weights(params[d * per_dir : (d + 1) * per_dir], has_biases, has_proj)
            for d in range(lo, hi)
        ]
        x, h, c = _layer(x, hx[lo:hi], cx[lo:hi], directions)
        if dropout > 0 and train and layer < num_layers - 1:
            x = F.dropout(x, dropout, training=True)
        h_n.append(h)
        c_n.append(c)
    return x, torch.cat(h_n), torch.cat(c_n)


def lstm_cell(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """FusedLSTMCell's step for export, as a one-step layer: ``input (B, I)``, ``h0``, ``c0``
    ``(B, H)``. Returns ``(h, c)``."""
    _, h, c = _layer(input[None], h0[None], c0[None], [(w_ih, w_hh, b_ih, b_hh, None)])
    return h[0], c[0]


def _layer(x: Tensor, h0: Tensor, c0: Tensor, directions: list[tuple]) -> tuple[Tensor, ...]:
    """One layer, its directions' weights as ``split_direction_weights`` gives them."""
    if directions[0][-1] is None:
        return _lstm_node(x, h0, c0, [d[:4] for d in directions])
    # With a projection: see the module's docstring.
    D, P = len(directions), h0.shape[-1]
    no_state = torch.zeros_like(x[1:, :, :1]).expand(-1, -1, P)
    first_steps = [torch.cat([h0[0:1], no_state]), torch.cat([no_state, h0[1:2]])][:D]
    weights = []
    for d, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(directions):
        blocks = [w_hh if k == d else torch.zeros_like(w_hh) for k in range(D)]
        weights.append((torch.cat([w_ih, *blocks], dim=1), w_hh @ w_hr, b_ih, b_hh))
    m0 = c0.new_zeros(c0.shape)
    m, m_n, c_n = _lstm_node(torch.cat([x, *first_steps], dim=-1), m0, c0, weights)
    H = c0.shape[-1]
    projected = [m[..., d * H : (d + 1) * H] @ w[-1].t() for d, w in enumerate(directions)]
    h_n = torch.stack([m_n[d] @ w[-1].t() for d, w in enumerate(directions)])
    return torch.cat(projected, dim=-1), h_n, c_n


def _lstm_node(x: Tensor, h0: Tensor, c0: Tensor, weights: list[tuple]) -> tuple[Tensor, ...]:
    """One ONNX ``LSTM`` node without projection: ``x (T, B, I)``, ``h0``, ``c0 (D, B, H)``,
    per direction ``(w_ih, w_hh, b_ih, b_hh)`` in PyTorch's layout (biases None or both set).
    Returns ``output (T, B, D*H)``, ``h_n``, ``c_n (D, B, H)``, as ``aten::lstm`` does."""
    has_biases = weights[0][2] is not None
    # Eagerly too, where the symbolic node would compute nothing: the tests check this
    # module's arithmetic that way, in float64.
    if torch.jit.is_tracing() or not exporting():
        flat = [w for direction in weights for w in direction if w is not None]
        return tuple(
            torch._VF.lstm(x, (h0, c0), flat, has_biases, 1, 0.0, False, len(weights) == 2, False)
        )
    T, B, _ = x.shape
    D, H = len(weights), c0.shape[-1]
    # ONNX's inputs: W (D, 4H, I), R (D, 4H, H), B (D, 8H) = [Wb, Rb], gates reordered.
    W, R = (torch.stack([_onnx_gates(w[k]) for w in weights]) for k in (0, 1))
    bias = (
        torch.stack([torch.cat([_onnx_gates(w[2]), _onnx_gates(w[3])]) for w in weights])
        if has_biases
        else None
    )
    y, h_n, c_n = torch.onnx.ops.symbolic_multi_out(
        "LSTM",
        [x, W, R, bias, None, h0, c0],
        {"hidden_size": H, "direction": "bidirectional" if D == 2 else "forward"},
        dtypes=[x.dtype] * 3,
        shapes=[(T, D, B, H), (D, B, H), (D, B, H)],
    )
    # ONNX's Y is (T, D, B, H); PyTorch's output (T, B, D*H).
    return y.permute(0, 2, 1, 3).reshape(T, B, D * H), h_n, c_n


def _onnx_gates(w: Tensor) -> Tensor:
    return w.unflatten(0, (4, -1))[_ONNX_GATE_ORDER].flatten(0, 1)

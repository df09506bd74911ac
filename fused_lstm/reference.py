"""Pure-PyTorch LSTM layer and cell with a handwritten backward: the oracle and the fallback.

Each function has exactly the signature of the native op of its name (``fused_lstm::layer_forward``,
``layer_backward``, ``cell_forward``, ``cell_backward``, declared in ``csrc/ops.cpp``), so the
autograd glue can call either one. A layer call handles one layer in one direction; the cell
functions are one step of it (see :func:`cell_forward`).

Layouts (PyTorch's): ``w_ih (4H, I)``, ``w_hh (4H, Hr)``, ``b_ih, b_hh (4H)``, ``w_hr (P, H)``,
gate rows in the order i, f, g, o, and ``Hr = P`` with a projection, else ``H``.

``input`` is either time-major padded ``(T, B, I)`` with ``batch_sizes=None``, or the data of a
PackedSequence ``(N, I)`` with its ``batch_sizes`` (a CPU int64 tensor, sorted descending).
Either way step ``t`` owns a contiguous block of rows, of which the first ``batch_sizes[t]``
batch rows are active. ``h0 (B, Hr)`` and ``c0 (B, H)`` are the initial states.

The forward returns ``output (…, Hr)``, ``h_n (B, Hr)``, ``c_n (B, H)`` and the workspace the
backward needs: ``gates (…, 4H)`` (the activations i, f, g, o) and ``cells (…, H)`` (c_t).

The layer functions also take the ops' regularisers and resets (``recurrent_mask``,
``zoneout_cell``, ``zoneout_hidden``, ``reset``), with the meanings ``csrc/ops.cpp`` gives them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def step_rows(input: Tensor, batch_sizes: Tensor | None, reverse: bool) -> list[tuple[int, int]]:
    """(first row, active batch rows) of every step, in the order the recurrence visits them."""
    if batch_sizes is None:
        T, B = input.shape[0], input.shape[1]
        sizes = [B] * T
    else:
        sizes = batch_sizes.tolist()
    starts, row = [], 0
    for bs in sizes:
        starts.append(row)
        row += bs
    steps = list(zip(starts, sizes))
    return steps[::-1] if reverse else steps


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _per_row(z: Tensor | None, rows: slice) -> Tensor | None:
    """A zoneout weight for the rows of a step: the 0-dim rate itself, or the mask's rows."""
    return z if z is None or z.dim() == 0 else _flat(z)[rows]


def _mix(d: Tensor, prev: Tensor, new: Tensor) -> Tensor:
    # lstm_gates.h's zoneout_mix, in the same order of operations.
    return d * prev + (1 - d) * new


def _entering_state(h: Tensor, c: Tensor, reset: Tensor | None, rows: slice
                    ) -> tuple[Tensor, Tensor]:
    """The state a step starts from: the previous one's, zeros where reset is set."""
    if reset is None:
        return h, c
    keep = ~reset.reshape(-1)[rows, None]
    return torch.where(keep, h, 0), torch.where(keep, c, 0)


def layer_forward(
    input: Tensor,
    batch_sizes: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    reverse: bool,
    recurrent_mask: Tensor | None = None,
    zoneout_cell: Tensor | None = None,
    zoneout_hidden: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    H = w_hh.shape[0] // 4
    x = _flat(input)
    # Gx for every step at once; the recurrence below only adds h_{t-1} @ W_hh^T.
    gates = x @ w_ih.t()
    if b_ih is not None:
        gates = gates + (b_ih + b_hh)
    cells = x.new_empty(x.shape[0], H)
    output = x.new_empty(x.shape[0], w_hh.shape[1])
    h, c = h0, c0
    for start, bs in step_rows(input, batch_sizes, reverse):
        rows = slice(start, start + bs)
        h_prev, c_prev = _entering_state(h[:bs], c[:bs], reset, rows)
        h_in = h_prev if recurrent_mask is None else h_prev * recurrent_mask[:bs]
        z = gates[rows] + h_in @ w_hh.t()
        i, f, g, o = z.chunk(4, dim=1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c_new = f * c_prev + i * g
        h_new = o * c_new.tanh()
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        if zoneout_cell is not None:
            c_new = _mix(_per_row(zoneout_cell, rows), c_prev, c_new)
        if zoneout_hidden is not None:
            h_new = _mix(_per_row(zoneout_hidden, rows), h_prev, h_new)
        gates[rows] = torch.cat([i, f, g, o], dim=1)
        cells[rows] = c_new
        output[rows] = h_new
        # Rebound rather than written in place, so that autograd can run through this forward
        # (the tests check the handwritten backwards against it).
        h, c = torch.cat([h_new, h[bs:]]), torch.cat([c_new, c[bs:]])
    lead = input.shape[:-1]
    return (
        output.reshape(*lead, w_hh.shape[1]),
        h,
        c,
        gates.reshape(*lead, 4 * H),
        cells.reshape(*lead, H),
    )


def previous_states(
    input: Tensor, batch_sizes: Tensor | None, h0: Tensor, c0: Tensor,
    output: Tensor, cells: Tensor, reverse: bool, reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The state every row's step started from (h_{t-1} and c_{t-1}, zeros where reset), rebuilt
    from the saved outputs instead of being saved."""
    y, cs = _flat(output), _flat(cells)
    h_prev, c_prev = torch.empty_like(y), torch.empty_like(cs)
    h, c = h0.clone(), c0.clone()
    for start, bs in step_rows(input, batch_sizes, reverse):
        rows = slice(start, start + bs)
        h_prev[rows], c_prev[rows] = _entering_state(h[:bs], c[:bs], reset, rows)
        h[:bs] = y[rows]
        c[:bs] = cs[rows]
    return h_prev, c_prev


def layer_backward(
    grad_output: Tensor | None,
    grad_h_n: Tensor | None,
    grad_c_n: Tensor | None,
    input: Tensor,
    batch_sizes: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    output: Tensor,
    gates: Tensor,
    cells: Tensor,
    reverse: bool,
    recurrent_mask: Tensor | None = None,
    zoneout_cell: Tensor | None = None,
    zoneout_hidden: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x, acts, cs = _flat(input), _flat(gates), _flat(cells)
    h_prev, c_prev = previous_states(input, batch_sizes, h0, c0, output, cells, reverse, reset)
    dy = None if grad_output is None else _flat(grad_output)

    dh = torch.zeros_like(h0) if grad_h_n is None else grad_h_n.clone()
    dc = torch.zeros_like(c0) if grad_c_n is None else grad_c_n.clone()
    dz_all = torch.empty_like(acts)
    h_in = h_prev.clone()  # what entered the recurrent product, for dW_hh
    # With a projection, dW_hr needs the gradient reaching each projection output and m_t.
    dh_all = torch.empty_like(h_prev) if w_hr is not None else None
    m_all = torch.empty_like(cs) if w_hr is not None else None

    for start, bs in reversed(step_rows(input, batch_sizes, reverse)):
        rows = slice(start, start + bs)
        dh_t = dh[:bs] if dy is None else dh[:bs] + dy[rows]
        dh_kept = None
        if zoneout_hidden is not None:
            d = _per_row(zoneout_hidden, rows)
            dh_t, dh_kept = (1 - d) * dh_t, d * dh_t
        i, f, g, o = acts[rows].chunk(4, dim=1)
        cp = c_prev[rows]
        # With zoneout, cells holds the mixed state: the plain update is recomputed.
        c_upd = cs[rows] if zoneout_cell is None else f * cp + i * g
        tc = c_upd.tanh()
        if dh_all is not None:
            dh_all[rows] = dh_t
            m_all[rows] = o * tc
            dm = dh_t @ w_hr
        else:
            dm = dh_t
        dc_in, dc_kept = dc[:bs], None
        if zoneout_cell is not None:
            d = _per_row(zoneout_cell, rows)
            dc_in, dc_kept = (1 - d) * dc_in, d * dc_in
        d_o = dm * tc
        dc_t = dc_in + dm * o * (1 - tc * tc)
        di, dg, df = dc_t * g, dc_t * i, dc_t * cp
        dc_prev = dc_t * f
        if dc_kept is not None:
            dc_prev = dc_prev + dc_kept
        dz = torch.cat(
            [di * i * (1 - i), df * f * (1 - f), dg * (1 - g * g), d_o * o * (1 - o)], dim=1
        )
        dz_all[rows] = dz
        dh_prev = dz @ w_hh
        if recurrent_mask is not None:
            dh_prev = dh_prev * recurrent_mask[:bs]
            h_in[rows] = h_prev[rows] * recurrent_mask[:bs]
        if dh_kept is not None:
            dh_prev = dh_prev + dh_kept
        if reset is not None:
            keep = ~reset.reshape(-1)[rows, None]
            dh_prev, dc_prev = torch.where(keep, dh_prev, 0), torch.where(keep, dc_prev, 0)
        dh[:bs] = dh_prev
        dc[:bs] = dc_prev

    grad_input = (dz_all @ w_ih).reshape(input.shape)
    grad_w_ih = dz_all.t() @ x
    grad_w_hh = dz_all.t() @ h_in
    grad_bias = dz_all.sum(0)
    grad_w_hr = dh_all.t() @ m_all if w_hr is not None else x.new_empty(0)
    return grad_input, dh, dc, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr


# The cell is a layer run on a sequence of one step, as in the native ops (csrc/layer_ops.h).


def cell_forward(input: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                 b_ih: Tensor | None, b_hh: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of nn.LSTMCell: ``input (B, I)``, ``h0``, ``c0 (B, H)``. Returns ``h``, ``c`` and
    the workspace of cell_backward, ``gates (B, 4H)`` and ``cells (B, H)`` (c, in a tensor of its
    own that stays unchanged whatever the caller does to ``c``)."""
    _, h, c, gates, cells = layer_forward(input.unsqueeze(0), None, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                          None, False)
    return h, c, gates[0], cells[0]


def cell_backward(grad_h: Tensor | None, grad_c: Tensor | None, input: Tensor, h0: Tensor,
                  c0: Tensor, w_ih: Tensor, w_hh: Tensor, gates: Tensor,
                  cells: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of input, h0, c0, w_ih, w_hh and of either bias."""
    # With one step every h_{t-1} is h0, so layer_backward uses only the shape of the output it
    # is given, which h0 has.
    dx, dh0, dc0, dw_ih, dw_hh, db, _ = layer_backward(
        None, grad_h, grad_c, input.unsqueeze(0), None, h0, c0, w_ih, w_hh, None,
        h0.unsqueeze(0), gates.unsqueeze(0), cells.unsqueeze(0), False)
    return dx[0], dh0, dc0, dw_ih, dw_hh, db

"""Pure-PyTorch LSTM layer and cell with a handwritten backward: the oracle and the fallback.

Each function has exactly the signature of the native op of its name (``fused_lstm::layer_forward``,
``layer_backward``, ``cell_forward``, ``cell_backward``, ``keep_mask``, ``lstm``, declared in
``fused_lstm/_library.py``), so the autograd glue can call either one. A layer call handles one
layer in one direction; the cell functions are one step of it (see :func:`cell_forward`).

Layouts (PyTorch's): ``w_ih (4H, I)``, ``w_hh (4H, Hr)``, ``b_ih, b_hh (4H)``, ``w_hr (P, H)``,
gate rows in the order i, f, g, o, and ``Hr = P`` with a projection, else ``H``.

``input`` is either time-major padded ``(T, B, I)`` with ``batch_sizes=None``, or the data of a
PackedSequence ``(N, I)`` with its ``batch_sizes`` (a CPU int64 tensor, sorted descending).
Either way step ``t`` owns a contiguous block of rows, of which the first ``batch_sizes[t]``
batch rows are active. ``h0 (B, Hr)`` and ``c0 (B, H)`` are the initial states.

The forward returns ``output (…, Hr)``, ``h_n (B, Hr)``, ``c_n (B, H)`` and the workspace the
backward needs: ``gates (…, 4H)`` (the activations i, f, g, o) and ``cells (…, H)`` (c_t).

The layer functions also take the ops' regularisers and resets (``recurrent_mask``,
``zoneout_cell``, ``zoneout_hidden``, ``reset``), with the meanings ``fused_lstm/_library.py``
gives them.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def _kernel(fn):
    """A kernel op's reference computes in its inputs' dtype, as the native kernels do
    (csrc/layer_ops.h's KernelGuard): the modules cast for autocast as nn.LSTM does, and an
    enclosing autocast region would otherwise recast the products inside."""

    @functools.wraps(fn)
    def kernel(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return kernel


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


def _entering_state(
    h: Tensor, c: Tensor, reset: Tensor | None, rows: slice
) -> tuple[Tensor, Tensor]:
    """The state a step starts from: the previous one's, zeros where reset is set."""
    if reset is None:
        return h, c
    keep = ~reset.reshape(-1)[rows, None]
    return torch.where(keep, h, 0), torch.where(keep, c, 0)


@_kernel
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
    input: Tensor,
    batch_sizes: Tensor | None,
    h0: Tensor,
    c0: Tensor,
    output: Tensor,
    cells: Tensor,
    reverse: bool,
    reset: Tensor | None = None,
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


@_kernel
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


@_kernel
def cell_forward(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of nn.LSTMCell: ``input (B, I)``, ``h0``, ``c0 (B, H)``. Returns ``h``, ``c`` and
    the workspace of cell_backward, ``gates (B, 4H)`` and ``cells (B, H)`` (c, in a tensor of its
    own that stays unchanged whatever the caller does to ``c``)."""
    _, h, c, gates, cells = layer_forward(
        input.unsqueeze(0), None, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False
    )
    return h, c, gates[0], cells[0]


@_kernel
def cell_backward(
    grad_h: Tensor | None,
    grad_c: Tensor | None,
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    gates: Tensor,
    cells: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of input, h0, c0, w_ih, w_hh and of either bias."""
    # With one step every h_{t-1} is h0, so layer_backward uses only the shape of the output it
    # is given, which h0 has.
    dx, dh0, dc0, dw_ih, dw_hh, db, _ = layer_backward(
        None,
        grad_h,
        grad_c,
        input.unsqueeze(0),
        None,
        h0,
        c0,
        w_ih,
        w_hh,
        None,
        h0.unsqueeze(0),
        gates.unsqueeze(0),
        cells.unsqueeze(0),
        False,
    )
    return dx[0], dh0, dc0, dw_ih, dw_hh, db


# The whole-LSTM op, as csrc/autograd/lstm_op.cpp composes it from layer_forward: the kernel of
# fused_lstm::lstm in an install without the native kernels, and the oracle of that composition.
# It draws its masks with the same ops in the same order, so with the same seed both give the
# same bits.


def _check_rate(p: float, name: str, one_allowed: bool) -> None:
    if not (p >= 0 and (p <= 1 if one_allowed else p < 1)):
        raise RuntimeError(
            f"fused_lstm: {name} must be in [0, {'1]' if one_allowed else '1)'}, got {p}"
        )


def keep_mask(like: Tensor, size: list[int], prob: float, value: float) -> Tensor:
    """The op keep_mask without the native kernels: bernoulli_, as its composite kernel in
    csrc/cpu/keep_mask.cpp on devices without a kernel of their own."""
    if not 0 <= prob <= 1:
        raise RuntimeError(f"fused_lstm: keep_mask's prob must be in [0, 1], got {prob}")
    return torch.empty(size, dtype=like.dtype, device=like.device).bernoulli_(prob).mul_(value)


def _keep_mask(like: Tensor, size, prob: float, value: float) -> Tensor:
    # like gives the dtype and device only: detached, autograd has nothing to follow through it.
    return torch.ops.fused_lstm.keep_mask(like.detach(), list(size), prob, value)


def _reset_for_reverse(reset: Tensor, batch_sizes: Tensor | None) -> Tensor:
    """reset as the reverse direction visits the rows: each row's flag is that of the same batch
    row at the next step (none after the last), whose sequence takes no state from this one."""
    if batch_sizes is None:
        return torch.cat([reset[1:], torch.zeros_like(reset[:1])])
    sizes, src, start = batch_sizes.tolist(), [], 0
    for t, bs in enumerate(sizes):
        nxt = sizes[t + 1] if t + 1 < len(sizes) else 0
        src += [start + bs + b if b < nxt else reset.shape[0] for b in range(bs)]
        start += bs
    padded = torch.cat([reset, reset.new_zeros(1)])
    return padded.index_select(0, torch.tensor(src, dtype=torch.long, device=reset.device))


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
    *,
    reset: Tensor | None = None,
    recurrent_dropout: float = 0.0,
    zoneout_cell: float = 0.0,
    zoneout_hidden: float = 0.0,
    weight_drop: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """nn.LSTM's forward through layer_forward, with the regularisers (docs/regularisers.md)."""
    if num_layers <= 0:
        raise RuntimeError(f"fused_lstm: num_layers must be positive, got {num_layers}")
    for p, name, one_allowed in (
        (dropout, "dropout", True),
        (recurrent_dropout, "recurrent_dropout", False),
        (zoneout_cell, "zoneout_cell", True),
        (zoneout_hidden, "zoneout_hidden", True),
        (weight_drop, "weight_drop", False),
    ):
        _check_rate(p, name, one_allowed)
    dirs = 2 if bidirectional else 1
    per_dir = 2 + 2 * has_biases + has_proj
    if len(params) != num_layers * dirs * per_dir:
        raise RuntimeError(
            f"fused_lstm: params must hold {per_dir} tensors per layer and direction "
            f"({num_layers * dirs * per_dir} in all, w_ih, w_hh"
            f"{', b_ih, b_hh' if has_biases else ''}{', w_hr' if has_proj else ''} each), "
            f"got {len(params)}"
        )
    if reset is not None and reset.dtype != torch.bool:
        raise RuntimeError(f"fused_lstm: reset must be a bool tensor, got {reset.dtype}")
    resets = [
        reset,
        _reset_for_reverse(reset, batch_sizes) if reset is not None and bidirectional else None,
    ]

    def zoneout(rate: float, x: Tensor, width: int) -> Tensor | None:
        if rate == 0:
            return None
        if not train:
            return torch.scalar_tensor(rate, dtype=x.dtype, device=x.device)
        return _keep_mask(x, [*x.shape[:-1], width], rate, 1.0)

    h_n, c_n, x = [], [], input
    for layer in range(num_layers):
        outs = []
        for d in range(dirs):
            k = layer * dirs + d
            w = params[k * per_dir : (k + 1) * per_dir]
            w_ih, w_hh = w[0], w[1]
            b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
            h0 = hx[k]
            if train and weight_drop > 0:
                w_hh = w_hh * _keep_mask(w_hh, w_hh.shape, 1 - weight_drop, 1 / (1 - weight_drop))
            mask = (
                _keep_mask(h0, h0.shape, 1 - recurrent_dropout, 1 / (1 - recurrent_dropout))
                if train and recurrent_dropout > 0
                else None
            )
            y, h, c, _, _ = torch.ops.fused_lstm.layer_forward(
                x,
                batch_sizes,
                h0,
                cx[k],
                w_ih,
                w_hh,
                b_ih,
                b_hh,
                w[-1] if has_proj else None,
                d == 1,
                mask,
                zoneout(zoneout_cell, x, w_hh.shape[0] // 4),
                zoneout(zoneout_hidden, x, h0.shape[-1]),
                resets[d],
            )
            outs.append(y)
            h_n.append(h)
            c_n.append(c)
        x = outs[0] if dirs == 1 else torch.cat(outs, -1)
        if train and dropout > 0 and layer < num_layers - 1:
            # at::dropout's draw, as aten::lstm makes it between layers.
            noise = (
                torch.zeros_like(x)
                if dropout == 1
                else torch.empty_like(x, memory_format=torch.contiguous_format)
                .bernoulli_(1 - dropout)
                .div_(1 - dropout)
            )
            x = x * noise
    return x, torch.stack(h_n), torch.stack(c_n)

"""Inputs nn.LSTM handles that a fused kernel could get wrong: non-contiguous and expanded
(stride 0) inputs, states and weights, batch size 0, NaN and Inf, a 100 000-step sequence.
Each compared with nn.LSTM / nn.LSTMCell in float64, values and gradients."""

import pytest
import torch
from torch import nn

from fused_lstm import FusedLSTM, FusedLSTMCell
from helpers import (
    assert_same,
    cell_outputs_and_grads,
    compare,
    grad_names,
    make_inputs,
    make_lstm,
    outputs_and_grads,
    run_lstm,
)

F64 = torch.float64
ATOL = 1e-9
KW = dict(num_layers=2, bidirectional=True, proj_size=2)  # Hr = 2, H = 4, 4 states


def pair(**kw):
    ref = nn.LSTM(3, 4, dtype=F64, **(KW | kw))
    return ref, FusedLSTM.from_lstm(ref)


def leaf(t):
    """t as a leaf that requires grad, keeping its strides (a stride-0 expand stays one)."""
    return t.detach().requires_grad_()


# Inputs of shape (T=5, B=3, I=3) laid out in memory in the ways nn.LSTM accepts.
LAYOUTS = {
    "transposed": lambda: torch.randn(3, 5, 3, dtype=F64).transpose(0, 1),
    "batch_expanded": lambda: torch.randn(5, 1, 3, dtype=F64).expand(5, 3, 3),
    "all_expanded": lambda: torch.randn(1, 1, 3, dtype=F64).expand(5, 3, 3),
    "strided": lambda: torch.randn(5, 3, 6, dtype=F64)[..., ::2],
}


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_and_expanded_inputs_and_states(backend, layout):
    ref, fused = pair()
    x = leaf(LAYOUTS[layout]())
    hx = (
        leaf(torch.randn(4, 1, 2, dtype=F64).expand(4, 3, 2)),
        leaf(torch.randn(4, 3, 8, dtype=F64)[..., ::2]),
    )
    assert not x.is_contiguous() and not any(h.is_contiguous() for h in hx)
    leaves = [x, *hx]
    assert_same(
        outputs_and_grads(ref, x, hx, leaves), outputs_and_grads(fused, x, hx, leaves), atol=ATOL
    )


@pytest.mark.backends("reference", "cpu")
def test_cell_non_contiguous_and_expanded_inputs_and_states(backend):
    ref = nn.LSTMCell(3, 4, dtype=F64)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x = leaf(torch.randn(3, 6, dtype=F64)[:, ::2])
    hx = (leaf(torch.randn(1, 4, dtype=F64).expand(3, 4)), leaf(torch.randn(4, 3, dtype=F64).t()))
    assert not x.is_contiguous() and not any(h.is_contiguous() for h in hx)
    leaves = [x, *hx]
    assert_same(
        cell_outputs_and_grads(ref, x, hx, leaves),
        cell_outputs_and_grads(fused, x, hx, leaves),
        atol=ATOL,
    )


def odd_layout(w):
    """w's values, with matrices stored column-major and vectors as a stride-0 expand of
    their first value."""
    if w.dim() == 2:
        return nn.Parameter(w.detach().t().contiguous().t())
    return nn.Parameter(w.detach()[:1].expand_as(w))


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("module", ["lstm", "cell"])
def test_non_contiguous_and_expanded_weights(backend, module):
    if module == "lstm":
        ref, fused = pair()
        x = torch.randn(5, 3, 3, dtype=F64, requires_grad=True)
    else:
        ref = nn.LSTMCell(3, 4, dtype=F64)
        fused = FusedLSTMCell.from_lstm_cell(ref)
        x = torch.randn(3, 3, dtype=F64, requires_grad=True)
    for name, w in list(ref.named_parameters()):
        shared = odd_layout(w)  # the same Parameter in both modules
        setattr(ref, name, shared)
        setattr(fused, name, shared)
    assert not any(p.is_contiguous() for p in fused.parameters())

    run = outputs_and_grads if module == "lstm" else cell_outputs_and_grads
    assert_same(run(ref, x, None, [x]), run(fused, x, None, [x]), atol=ATOL)


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("with_hx", [False, True])
def test_batch_size_zero(backend, batch_first, with_hx):
    """Empty outputs and states, zero weight gradients, as nn.LSTM."""
    ref, fused = pair(batch_first=batch_first)
    x = torch.randn(*((0, 5) if batch_first else (5, 0)), 3, dtype=F64, requires_grad=True)
    hx = (
        (
            torch.randn(4, 0, 2, dtype=F64, requires_grad=True),
            torch.randn(4, 0, 4, dtype=F64, requires_grad=True),
        )
        if with_hx
        else None
    )
    leaves = [x, *(hx or ())]
    want = outputs_and_grads(ref, x, hx, leaves)
    assert want[0].shape == ((0, 5, 4) if batch_first else (5, 0, 4))
    assert_same(want, outputs_and_grads(fused, x, hx, leaves), atol=ATOL)


@pytest.mark.backends("reference", "cpu")
def test_cell_batch_size_zero(backend):
    ref = nn.LSTMCell(3, 4, dtype=F64)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x = torch.randn(0, 3, dtype=F64, requires_grad=True)
    assert_same(
        cell_outputs_and_grads(ref, x, None, [x]),
        cell_outputs_and_grads(fused, x, None, [x]),
        atol=0,
    )


@pytest.mark.backends("reference", "cpu")
def test_cell_outputs_modified_in_place(backend):
    """h and c changed in place after the step (zoneout, masking): nn.LSTMCell on the CPU saves
    neither for its backward, and FusedLSTMCell keeps its own copy of c_t, so the gradients are
    those of the modified outputs."""
    ref = nn.LSTMCell(3, 4, dtype=F64)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.5]], dtype=F64)

    def run(cell):
        h, c = cell(x)
        h.mul_(mask)
        c.mul_(mask.flip(1))
        return [h, c, *torch.autograd.grad((h * h).sum() + c.sin().sum(), [x, *cell.parameters()])]

    assert_same(run(ref), run(fused), atol=ATOL)


def set_nonfinite(where, value, x, hx, ref):
    if where == "input":
        x.data[2, 1, 0] = value
    elif where == "h0":
        hx[0].data[1, 2, 1] = value
    elif where == "c0":
        hx[1].data[3, 0, 2] = value
    else:
        with torch.no_grad():
            ref.weight_hh_l0[5, 1] = value


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", ["input", "h0", "c0", "weight"])
def test_nan_and_inf_propagate_like_nn_lstm(backend, where, value):
    """The same values, Inf and NaN in the same places, in outputs and in gradients."""
    ref = nn.LSTM(3, 4, dtype=F64, **KW)
    x = torch.randn(6, 3, 3, dtype=F64, requires_grad=True)
    hx = (
        torch.randn(4, 3, 2, dtype=F64, requires_grad=True),
        torch.randn(4, 3, 4, dtype=F64, requires_grad=True),
    )
    set_nonfinite(where, value, x, hx, ref)
    fused = FusedLSTM.from_lstm(ref)
    leaves = [x, *hx]
    want = outputs_and_grads(ref, x, hx, leaves)
    assert any(not t.isfinite().all() for t in want)
    assert_same(want, outputs_and_grads(fused, x, hx, leaves), atol=ATOL, equal_nan=True)


def test_100k_step_sequence():
    """No crash, hang or drift over 100 000 steps. nn.LSTM's float64 backward takes about a
    minute for this (its CPU path records every step on autograd's tape), so the gradient is
    checked along one random direction v of all inputs and weights: <grad, v> against a central
    difference of nn.LSTM's loss, (L(p + eps v) - L(p - eps v)) / (2 eps), in float64."""
    T, eps = 100_000, 1e-6
    ref = nn.LSTM(2, 3, dtype=F64)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(T, 2, dtype=F64, requires_grad=True)
    hx = (
        torch.randn(1, 3, dtype=F64, requires_grad=True),
        torch.randn(1, 3, dtype=F64, requires_grad=True),
    )
    weights = torch.randn(T, 3, dtype=F64)

    def loss(out, h, c):
        return (out * weights).sum() + (h * h).sum() + c.sin().sum()

    out, (h, c) = fused(x, hx)
    names, params = zip(*fused.named_parameters())
    leaves = [x, *hx, *params]
    grads = torch.autograd.grad(loss(out, h, c), leaves)
    with torch.no_grad():
        want_out, (want_h, want_c) = ref(x, hx)
        assert_same([want_out, want_h, want_c], [out, h, c], atol=ATOL)

        v = [torch.randn_like(t) for t in leaves]
        directional = sum((g * d).sum() for g, d in zip(grads, v))

        def shifted_loss(sign):
            x_, h0, c0, *w = (t + sign * eps * d for t, d in zip(leaves, v))
            out_, (h_, c_) = torch.func.functional_call(ref, dict(zip(names, w)), (x_, (h0, c0)))
            return loss(out_, h_, c_)

        central = (shifted_loss(1) - shifted_loss(-1)) / (2 * eps)
    torch.testing.assert_close(directional, central, rtol=1e-6, atol=0)


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.no_launch
@pytest.mark.parametrize("batch", [0])
def test_batch_size_zero_launches_nothing(backend, batch):
    """No rows: nothing to launch (an empty grid is a launch error), empty results."""
    dev = backend.device
    lstm = make_lstm(dev, 2, True, False, True, 3, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = make_inputs(lstm, torch.float64, batch=batch)
    compare(run_lstm(fused, x, hx), run_lstm(lstm, x, hx), grad_names(lstm, True), atol=0, rtol=0)

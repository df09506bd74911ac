"""torch.autograd.gradcheck (float64) of the ops' C++ autograd (the whole-LSTM op, the layer
and the cell) on every flag, on each backend; double backward is refused."""

import itertools
import re

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTM, FusedLSTMCell
from fused_lstm._C import DOUBLE_BACKWARD_ERROR

I, H, P = 3, 4, 2


def layer_inputs(D, bias, proj, batch=2, steps=4, packed=False):
    Hr = P if proj else H
    dt = {"dtype": torch.float64, "requires_grad": True}
    weights = []
    for _ in range(D):
        weights += [torch.randn(4 * H, I, **dt) * 0.5, torch.randn(4 * H, Hr, **dt) * 0.5]
        if bias:
            weights += [torch.randn(4 * H, **dt), torch.randn(4 * H, **dt)]
        if proj:
            weights.append(torch.randn(Hr, H, **dt) * 0.5)
    if packed:
        seqs = [torch.randn(n, I, dtype=torch.float64) for n in (steps, steps - 1, 1)]
        pk = pack_sequence(seqs)
        x, batch_sizes, batch = pk.data.requires_grad_(), pk.batch_sizes, 3
    else:
        x, batch_sizes = torch.randn(steps, batch, I, **dt), None
    h0 = torch.randn(D, batch, Hr, **dt)
    c0 = torch.randn(D, batch, H, **dt)
    return x, batch_sizes, h0, c0, weights


@pytest.mark.parametrize("D,bias,proj,packed",
                         list(itertools.product([1, 2], [True, False], [False, True],
                                                [False, True])))
def test_layer_gradcheck(backend, D, bias, proj, packed):
    x, batch_sizes, h0, c0, weights = layer_inputs(D, bias, proj, packed=packed)

    def f(x, h0, c0, *w):
        return torch.ops.fused_lstm.lstm(x, batch_sizes, h0, c0, w, bias, proj, 1, 0.0, True,
                                         D == 2)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_gradcheck_single_output_used(backend, which):
    """Only one of output / h_n / c_n reaches the loss: the others' gradients are undefined."""
    x, batch_sizes, h0, c0, weights = layer_inputs(2, True, True)

    def f(x, h0, c0, *w):
        return torch.ops.fused_lstm.lstm(x, batch_sizes, h0, c0, w, True, True, 1, 0.0, True,
                                         True)[which]

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


@pytest.mark.parametrize("bias,batched", list(itertools.product([True, False], [True, False])))
def test_cell_gradcheck(backend, bias, batched):
    cell = FusedLSTMCell(I, H, bias=bias, dtype=torch.float64)
    lead = (2,) if batched else ()
    x = torch.randn(*lead, I, dtype=torch.float64, requires_grad=True)
    h = torch.randn(*lead, H, dtype=torch.float64, requires_grad=True)
    c = torch.randn(*lead, H, dtype=torch.float64, requires_grad=True)
    params = dict(cell.named_parameters())

    def f(x, h, c, *p):
        return torch.func.functional_call(cell, dict(zip(params, p)), (x, (h, c)))

    assert torch.autograd.gradcheck(f, (x, h, c, *params.values()))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("which", [None, 0, 1])
def test_cell_function_gradcheck(backend, bias, which):
    """cell_forward's autograd on the backend's cell ops (native or reference), with both outputs
    used or only h (which=0) or c (which=1)."""
    dt = {"dtype": torch.float64, "requires_grad": True}
    tensors = [torch.randn(3, I, **dt), torch.randn(3, H, **dt), torch.randn(3, H, **dt),
               torch.randn(4 * H, I, **dt) * 0.5, torch.randn(4 * H, H, **dt) * 0.5]
    if bias:
        tensors += [torch.randn(4 * H, **dt), torch.randn(4 * H, **dt)]

    def f(*ts):
        out = torch.ops.fused_lstm.cell_forward(*ts, *([] if bias else [None, None]))[:2]
        return out if which is None else out[which]

    assert torch.autograd.gradcheck(f, tensors)


def assert_double_backward_refused(params, f):
    """nn.LSTM on the CPU differentiates twice; the handwritten backward cannot, so the second
    backward raises, also where autograd would otherwise skip it (allow_unused=True) and return
    None. The first, with create_graph=True, is still right."""
    x = torch.randn(4, 2, I, dtype=torch.float64, requires_grad=True)
    plain = torch.autograd.grad(f(x).square().sum(), [x, *params])
    first = torch.autograd.grad(f(x).square().sum(), [x, *params], create_graph=True)
    for a, b in zip(plain, first):
        torch.testing.assert_close(b, a, atol=0, rtol=0)
    penalty = sum(g.square().sum() for g in first)
    with pytest.raises(RuntimeError, match=re.escape(DOUBLE_BACKWARD_ERROR)):
        torch.autograd.grad(penalty, [x, *params], allow_unused=True)
    with pytest.raises(RuntimeError, match=re.escape(DOUBLE_BACKWARD_ERROR)):
        first[1].sum().backward()


def test_double_backward_is_refused_lstm(backend):
    lstm = FusedLSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, dtype=torch.float64)
    assert_double_backward_refused(list(lstm.parameters()), lambda x: lstm(x)[0])


def test_double_backward_is_refused_cell(backend):
    cell = FusedLSTMCell(I, H, dtype=torch.float64)
    assert_double_backward_refused(list(cell.parameters()), lambda x: cell(x[0])[1])


def test_double_backward_is_refused_op(backend):
    """Through layer_forward's own autograd, not the lstm op's."""
    w = [torch.randn(4 * H, n, dtype=torch.float64, requires_grad=True) for n in (I, H)]
    zeros = torch.zeros(2, H, dtype=torch.float64)
    assert_double_backward_refused(w, lambda x: torch.ops.fused_lstm.layer_forward(
        x, None, zeros, zeros, *w, None, None, None, False)[0])


def test_double_backward_is_refused_cell_op(backend):
    """Through cell_forward's autograd called directly."""
    w = [torch.randn(4 * H, n, dtype=torch.float64, requires_grad=True) for n in (I, H)]
    zeros = torch.zeros(2, H, dtype=torch.float64)
    assert_double_backward_refused(w, lambda x: torch.ops.fused_lstm.cell_forward(
        x[0], zeros, zeros, *w, None, None)[1])

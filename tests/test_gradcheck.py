"""torch.autograd.gradcheck (float64) of the layer Function on every flag, on each backend."""

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTMCell, LSTMLayerFunction

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
        return LSTMLayerFunction.apply(x, batch_sizes, h0, c0, D, bias, proj, *w)

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


@pytest.mark.parametrize("which", [0, 1, 2])
def test_gradcheck_single_output_used(backend, which):
    """Only one of output / h_n / c_n reaches the loss: the others' gradients are undefined."""
    x, batch_sizes, h0, c0, weights = layer_inputs(2, True, True)

    def f(x, h0, c0, *w):
        return LSTMLayerFunction.apply(x, batch_sizes, h0, c0, 2, True, True, *w)[which]

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


def test_cell_gradcheck(backend):
    cell = FusedLSTMCell(I, H, dtype=torch.float64)
    x = torch.randn(2, I, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, H, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, H, dtype=torch.float64, requires_grad=True)
    params = dict(cell.named_parameters())

    def f(x, h, c, *p):
        return torch.func.functional_call(cell, dict(zip(params, p)), (x, (h, c)))

    assert torch.autograd.gradcheck(f, (x, h, c, *params.values()))

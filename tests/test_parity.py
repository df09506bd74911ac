"""FusedLSTM against nn.LSTM with copied weights, float64, tight tolerance: values and gradients,
on every flag combination, on the native CPU kernel and on the reference. The same for
FusedLSTMCell and for the cell ops themselves against nn.LSTMCell."""

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fused_lstm import FusedLSTM, FusedLSTMCell, native_backends, reference
from helpers import assert_same, cell_outputs_and_grads, outputs_and_grads

T, B, I, H, P = 5, 3, 4, 6, 3
ATOL = 1e-9
GRID = list(itertools.product([1, 2, 3], [True, False], [True, False], [False, True], [0, P],
                              [True, False]))


def make_pair(**kw):
    ref = nn.LSTM(I, H, dtype=torch.float64, **kw)
    return ref, FusedLSTM.from_lstm(ref)


def states(ref, batch, batched=True):
    D = 2 if ref.bidirectional else 1
    Hr = ref.proj_size or H
    lead = (ref.num_layers * D, batch) if batched else (ref.num_layers * D,)
    return (torch.randn(*lead, Hr, dtype=torch.float64, requires_grad=True),
            torch.randn(*lead, H, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,proj_size,with_hx", GRID)
def test_batched(backend, num_layers, bias, batch_first, bidirectional, proj_size, with_hx):
    ref, fused = make_pair(num_layers=num_layers, bias=bias, batch_first=batch_first,
                           bidirectional=bidirectional, proj_size=proj_size)
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = states(ref, B) if with_hx else None
    leaves = [x, *(hx or ())]
    assert_same(outputs_and_grads(ref, x, hx, leaves), outputs_and_grads(fused, x, hx, leaves),
                atol=ATOL)


@pytest.mark.parametrize("bidirectional,proj_size,with_hx",
                         list(itertools.product([False, True], [0, P], [True, False])))
def test_unbatched(backend, bidirectional, proj_size, with_hx):
    ref, fused = make_pair(num_layers=2, bidirectional=bidirectional, proj_size=proj_size)
    x = torch.randn(T, I, dtype=torch.float64, requires_grad=True)
    hx = states(ref, 1, batched=False) if with_hx else None
    leaves = [x, *(hx or ())]
    ref_vals = outputs_and_grads(ref, x, hx, leaves)
    assert ref_vals[0].shape == (T, (2 if bidirectional else 1) * (proj_size or H))
    assert_same(ref_vals, outputs_and_grads(fused, x, hx, leaves), atol=ATOL)


@pytest.mark.parametrize("enforce_sorted,bidirectional,proj_size,with_hx,batch_first",
                         list(itertools.product([True, False], [False, True], [0, P],
                                                [True, False], [False, True])))
def test_packed(backend, enforce_sorted, bidirectional, proj_size, with_hx, batch_first):
    ref, fused = make_pair(num_layers=2, bidirectional=bidirectional, proj_size=proj_size,
                           batch_first=batch_first)
    lengths = torch.tensor([7, 5, 5, 2] if enforce_sorted else [3, 7, 1, 5])
    shape = (4, 7, I) if batch_first else (7, 4, I)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = states(ref, 4) if with_hx else None
    leaves = [x, *(hx or ())]

    def run(module):
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first,
                                      enforce_sorted=enforce_sorted)
        return outputs_and_grads(module, packed, hx, leaves)

    assert_same(run(ref), run(fused), atol=ATOL)


@pytest.mark.parametrize("bias,batched,with_hx",
                         list(itertools.product([True, False], [True, False], [True, False])))
def test_cell(backend, bias, batched, with_hx):
    ref = nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    lead = (B,) if batched else ()
    x = torch.randn(*lead, I, dtype=torch.float64, requires_grad=True)
    hx = (torch.randn(*lead, H, dtype=torch.float64, requires_grad=True),
          torch.randn(*lead, H, dtype=torch.float64, requires_grad=True)) if with_hx else None
    leaves = [x, *(hx or ())]

    assert_same(cell_outputs_and_grads(ref, x, hx, leaves),
                cell_outputs_and_grads(fused, x, hx, leaves), atol=ATOL)


CELL_OPS = ["reference", pytest.param("native", marks=pytest.mark.skipif(
    "cpu" not in native_backends(), reason="fused_lstm._C not built"))]


@pytest.mark.parametrize("ops", CELL_OPS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", ["both", "h", "c"])
def test_cell_ops_match_nn_lstm_cell(ops, bias, used):
    """cell_forward's h and c, and cell_backward's gradients of input, h0, c0 and every weight
    for given incoming gradients (None for an unused output), against nn.LSTMCell's autograd."""
    namespace = reference if ops == "reference" else torch.ops.fused_lstm
    ref = nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
    x, h0, c0 = (torch.randn(B, n, dtype=torch.float64, requires_grad=True) for n in (I, H, H))
    params = list(ref.parameters())
    h, c = ref(x, (h0, c0))
    grad_h = torch.randn_like(h) if used != "c" else None
    grad_c = torch.randn_like(c) if used != "h" else None
    outs, grads = zip(*[(t, g) for t, g in ((h, grad_h), (c, grad_c)) if g is not None])
    want = [h, c, *torch.autograd.grad(outs, [x, h0, c0, *params], grads)]

    with torch.no_grad():
        weights = (*params, *((None, None) if not bias else ()))
        got_h, got_c, gates, cells = namespace.cell_forward(x, h0, c0, *weights)
        dx, dh0, dc0, dw_ih, dw_hh, db = namespace.cell_backward(
            grad_h, grad_c, x, h0, c0, *params[:2], gates, cells)
    got = [got_h, got_c, dx, dh0, dc0, dw_ih, dw_hh, *((db, db) if bias else ())]
    assert_same([t.detach() for t in want], got, atol=ATOL)


def test_only_c_n_used(backend):
    """Undefined incoming gradients: only c_n feeds the loss, output and h_n get none."""
    ref, fused = make_pair(num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (ref, fused):
        _, (_, c) = m(x)
        grads.append(torch.autograd.grad(c.sum(), [x, *m.parameters()]))
    assert_same(grads[0], grads[1], atol=ATOL)


def test_dropout_between_layers_only_in_training(backend):
    ref, fused = make_pair(num_layers=3, dropout=0.5)
    x = torch.randn(T, B, I, dtype=torch.float64)
    ref.eval(), fused.eval()
    assert_same([ref(x)[0]], [fused(x)[0]], atol=ATOL)
    fused.train()
    torch.manual_seed(1)
    a = fused(x)[0]
    torch.manual_seed(2)
    b = fused(x)[0]
    assert not torch.allclose(a, b)  # dropout is active in training
    fused.dropout = 0.0  # changing it later takes effect
    assert_same([ref(x)[0]], [fused(x)[0]], atol=ATOL)


def test_float32_close_to_nn_lstm(backend):
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(T, B, I, requires_grad=True)
    assert_same(outputs_and_grads(ref, x, None, [x]), outputs_and_grads(fused, x, None, [x]),
                atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("hidden", [1, 2, 4, 17, 20, 33, 64, 130])
def test_sizes_across_vector_widths(backend, hidden):
    """Hidden sizes below, at and across the kernels' 4-, 8- and 16-wide vector blocks."""
    for dtype, atol in ((torch.float64, ATOL), (torch.float32, 3e-5)):
        ref = nn.LSTM(3, hidden, dtype=dtype)
        fused = FusedLSTM.from_lstm(ref)
        x = torch.randn(9, 2, 3, dtype=dtype, requires_grad=True)
        assert_same(outputs_and_grads(ref, x, None, [x]), outputs_and_grads(fused, x, None, [x]),
                    atol=atol, rtol=1e-4 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, H, proj", [(70, 96, 40), (1, 640, 0), (48, 320, 0)])
def test_large_steps_threads_and_gemm_paths(backend, threads, B, H, proj):
    """Steps big enough that the CPU kernel splits the per-step products' columns across
    threads (an uneven split with 3), over packed panels (B=70, B=48) or over a batch of one
    (B=1). tests/test_cpu_kernels.py crosses each tile, panel and threshold, BLAS's included."""
    ref = nn.LSTM(16, H, proj_size=proj, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(3, B, 16, dtype=torch.float64, requires_grad=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_same(outputs_and_grads(ref, x, None, [x]), outputs_and_grads(fused, x, None, [x]),
                    atol=ATOL)
    finally:
        torch.set_num_threads(saved)

"""torch.autograd.gradcheck (float64) of the ops' C++ autograd (the whole-LSTM op, the layer
and the cell) on every flag, on each backend; double backward is refused."""

import itertools
import re

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMCell
from fused_lstm._library import DOUBLE_BACKWARD_ERROR
from helpers import CELL_GRADS, FLAGS, cell_args, lstm_args, needs_extension, op_args

I, H, P = 3, 4, 2
F64 = torch.float64


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


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize(
    "D,bias,proj,packed",
    list(itertools.product([1, 2], [True, False], [False, True], [False, True])),
)
def test_layer_gradcheck(backend, D, bias, proj, packed):
    x, batch_sizes, h0, c0, weights = layer_inputs(D, bias, proj, packed=packed)

    def f(x, h0, c0, *w):
        return torch.ops.fused_lstm.lstm(
            x, batch_sizes, h0, c0, w, bias, proj, 1, 0.0, True, D == 2
        )

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("which", [0, 1, 2])
def test_gradcheck_single_output_used(backend, which):
    """Only one of output / h_n / c_n reaches the loss: the others' gradients are undefined."""
    x, batch_sizes, h0, c0, weights = layer_inputs(2, True, True)

    def f(x, h0, c0, *w):
        return torch.ops.fused_lstm.lstm(x, batch_sizes, h0, c0, w, True, True, 1, 0.0, True, True)[
            which
        ]

    assert torch.autograd.gradcheck(f, (x, h0, c0, *weights))


@pytest.mark.backends("reference", "cpu")
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


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("which", [None, 0, 1])
def test_cell_function_gradcheck(backend, bias, which):
    """cell_forward's autograd on the backend's cell ops (native or reference), with both outputs
    used or only h (which=0) or c (which=1)."""
    dt = {"dtype": torch.float64, "requires_grad": True}
    tensors = [
        torch.randn(3, I, **dt),
        torch.randn(3, H, **dt),
        torch.randn(3, H, **dt),
        torch.randn(4 * H, I, **dt) * 0.5,
        torch.randn(4 * H, H, **dt) * 0.5,
    ]
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


@pytest.mark.backends("reference", "cpu")
def test_double_backward_is_refused_lstm(backend):
    lstm = FusedLSTM(I, H, num_layers=2, bidirectional=True, proj_size=P, dtype=torch.float64)
    assert_double_backward_refused(list(lstm.parameters()), lambda x: lstm(x)[0])


@pytest.mark.backends("reference", "cpu")
def test_double_backward_is_refused_cell(backend):
    cell = FusedLSTMCell(I, H, dtype=torch.float64)
    assert_double_backward_refused(list(cell.parameters()), lambda x: cell(x[0])[1])


@pytest.mark.backends("reference", "cpu")
def test_double_backward_is_refused_op(backend):
    """Through layer_forward's own autograd, not the lstm op's."""
    w = [torch.randn(4 * H, n, dtype=torch.float64, requires_grad=True) for n in (I, H)]
    zeros = torch.zeros(2, H, dtype=torch.float64)
    assert_double_backward_refused(
        w,
        lambda x: torch.ops.fused_lstm.layer_forward(
            x, None, zeros, zeros, *w, None, None, None, False
        )[0],
    )


@pytest.mark.backends("reference", "cpu")
def test_double_backward_is_refused_cell_op(backend):
    """Through cell_forward's autograd called directly."""
    w = [torch.randn(4 * H, n, dtype=torch.float64, requires_grad=True) for n in (I, H)]
    zeros = torch.zeros(2, H, dtype=torch.float64)
    assert_double_backward_refused(
        w, lambda x: torch.ops.fused_lstm.cell_forward(x[0], zeros, zeros, *w, None, None)[1]
    )


# ---- the CUDA kernels (emulated, and on a GPU) -------------------------------------------


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize(
    "bidir,proj,packed", [(False, 0, False), (True, 2, False), (True, 0, True), (False, 2, True)]
)
def test_gradcheck_float64(backend, bidir, proj, packed):
    dev = backend.device
    torch.manual_seed(0)
    fused = FusedLSTM(3, 4, bidirectional=bidir, proj_size=proj, device=dev, dtype=torch.float64)
    D, Hr = (2 if bidir else 1), (proj or 4)
    names = [n for n, _ in fused.named_parameters()]
    x = torch.randn(3, 2, 3, device=dev, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(D, 2, Hr, device=dev, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(D, 2, 4, device=dev, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in fused.parameters()]

    def f(x, h0, c0, *params):
        inp = pack_padded_sequence(x, torch.tensor([3, 2])) if packed else x
        out, (h, c) = functional_call(fused, dict(zip(names, params)), (inp, (h0, c0)))
        return (out.data if packed else out), h, c

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("bias,batched", [(True, True), (False, False)])
def test_cell_gradcheck_float64(backend, bias, batched):
    dev = backend.device
    torch.manual_seed(0)
    fused = FusedLSTMCell(3, 4, bias=bias, device=dev, dtype=torch.float64)
    names = [n for n, _ in fused.named_parameters()]
    lead = (2,) if batched else ()
    like = dict(device=dev, dtype=torch.float64, requires_grad=True)
    x, h0, c0 = (
        torch.randn(*lead, 3, **like),
        torch.randn(*lead, 4, **like),
        torch.randn(*lead, 4, **like),
    )
    params = [p.detach().clone().requires_grad_() for p in fused.parameters()]

    def f(x, h0, c0, *params):
        return functional_call(fused, dict(zip(names, params)), (x, (h0, c0)))

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


# ---- the ops called directly (arguments from helpers.op_args, cell_args, lstm_args) -------


@pytest.mark.parametrize("proj,bias,packed,reverse", FLAGS)
def test_op_gradcheck(proj, bias, packed, reverse):
    """layer_forward is differentiable on its own through its registered autograd."""
    args = op_args(proj, bias, packed, reverse, requires_grad=True)
    x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _ = args
    tensors = [t for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr) if t is not None]

    def f(*ts):
        it = iter(ts)
        full = [
            next(it) if a is not None and a is not bs and isinstance(a, torch.Tensor) else a
            for a in args
        ]
        return torch.ops.fused_lstm.layer_forward(*full)[:3]

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", CELL_GRADS)
def test_cell_op_gradcheck(bias, used):
    """cell_forward is differentiable on its own through its registered autograd; with one
    output unused, its incoming gradient is undefined."""
    args = cell_args(bias, requires_grad=True)
    tensors = [t for t in args if t is not None]

    def f(*ts):
        h, c, _, _ = torch.ops.fused_lstm.cell_forward(*ts, *([None, None] if not bias else []))
        return {"both": (h, c), "h": h, "c": c}[used]

    assert torch.autograd.gradcheck(f, tensors)


@pytest.mark.parametrize(
    "num_layers,bidirectional,proj,bias,packed",
    [(2, True, True, True, False), (2, True, False, False, True), (3, False, True, True, True)],
)
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_lstm_op_gradcheck(num_layers, bidirectional, proj, bias, packed, dropout):
    """In training, with the same masks at every evaluation (seeded)."""
    args = lstm_args(
        num_layers, bidirectional, proj, bias, packed, dropout, True, requires_grad=True, batch=2
    )
    x, batch_sizes, hx, cx, params = args[:5]

    def f(x, hx, cx, *params):
        torch.manual_seed(3)
        return torch.ops.fused_lstm.lstm(x, batch_sizes, hx, cx, params, *args[5:])

    assert torch.autograd.gradcheck(f, (x, hx, cx, *params))


# ---- with the regularisers, on every backend: the masks redrawn from the same seed at every
# call ------------------------------------------------------------------------------------------


REGULARISED = [  # (kwargs of the lstm op, num_layers, bidirectional, proj, packed)
    ({"recurrent_dropout": 0.3}, 1, False, False, False),
    ({"zoneout_cell": 0.3}, 1, False, True, False),
    ({"zoneout_hidden": 0.4}, 1, True, True, True),
    ({"weight_drop": 0.4}, 2, False, False, True),
    ({"reset": True}, 1, True, False, False),
    ({"reset": True}, 1, True, True, True),
    (
        {
            "recurrent_dropout": 0.3,
            "zoneout_cell": 0.2,
            "zoneout_hidden": 0.3,
            "weight_drop": 0.3,
            "reset": True,
        },
        2,
        True,
        True,
        False,
    ),
    (
        {
            "recurrent_dropout": 0.3,
            "zoneout_cell": 0.2,
            "zoneout_hidden": 0.3,
            "weight_drop": 0.3,
            "reset": True,
        },
        2,
        True,
        False,
        True,
    ),
]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kwargs,num_layers,bidirectional,proj,packed", REGULARISED)
def test_regularised_lstm_op_gradcheck(
    backend, kwargs, num_layers, bidirectional, proj, packed, train
):
    device = backend.device
    I, H, P = 3, 5, 2  # test_regularisers.py's sizes
    D, Hr, B = 2 if bidirectional else 1, P if proj else H, 3
    lstm = nn.LSTM(
        I,
        H,
        num_layers,
        bidirectional=bidirectional,
        proj_size=P if proj else 0,
        dtype=F64,
        device=device,
    )
    params = [p.detach().clone().requires_grad_() for p in lstm._flat_weights]
    dt = {"dtype": F64, "device": device, "requires_grad": True}
    if packed:
        batch_sizes = torch.tensor([3, 3, 2, 1])
        x = torch.randn(9, I, **dt)
    else:
        batch_sizes, x = None, torch.randn(4, B, I, **dt)
    hx, cx = torch.randn(num_layers * D, B, Hr, **dt), torch.randn(num_layers * D, B, H, **dt)
    kwargs = dict(kwargs)
    if kwargs.pop("reset", False):
        reset = torch.zeros(x.shape[:-1], dtype=torch.bool, device=device)
        reset.view(-1)[[1, 4, 5]] = True
        kwargs["reset"] = reset

    def f(x, hx, cx, *params):
        torch.manual_seed(7)  # the same masks at every call gradcheck makes
        return torch.ops.fused_lstm.lstm(
            x,
            batch_sizes,
            hx,
            cx,
            params,
            True,
            proj,
            num_layers,
            0.0,
            train,
            bidirectional,
            **kwargs,
        )

    assert torch.autograd.gradcheck(f, (x, hx, cx, *params))


@needs_extension
def test_the_extension_refuses_double_backward_with_the_same_message():
    assert fused_lstm._C.DOUBLE_BACKWARD_ERROR == DOUBLE_BACKWARD_ERROR

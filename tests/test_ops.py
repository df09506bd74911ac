"""The dispatcher ops themselves: opcheck (schema, fake tensors, AOT dispatch), direct parity
of the kernel ops with the reference that shares their signatures and of the whole-LSTM op with
aten::lstm, their argument checks and gradcheck."""

import functools

import pytest
import torch

import fused_lstm
from fused_lstm import reference
from helpers import (
    CELL_GRADS,
    FLAGS,
    assert_same,
    cell_args,
    lstm_args,
    needs_extension,
    op_args,
    ramp,
)

I, H, P = 3, 5, 2


def call_with(op, args, bad):
    """op on args with some of them replaced: bad(args) maps positions to their bad values."""
    args = list(args)
    for k, v in bad(args).items():
        args[k] = v
    return op(*args)


@pytest.mark.parametrize("proj,bias,packed,reverse", FLAGS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.backends("cpu", "cuda")
def test_opcheck(proj, bias, packed, reverse, requires_grad, backend):
    device = backend.device
    args = op_args(proj, bias, packed, reverse, requires_grad, device)
    torch.library.opcheck(torch.ops.fused_lstm.layer_forward, args)
    x, bs, h0, c0, w_ih, w_hh, _, _, w_hr, _ = args
    with torch.no_grad():
        y, hn, cn, gates, cells = torch.ops.fused_lstm.layer_forward(*args)
    # With requires_grad, this checks layer_backward's registration as non-differentiable.
    for grads in (
        (torch.randn_like(y), torch.randn_like(hn), torch.randn_like(cn)),
        (None, None, torch.randn_like(cn)),
    ):
        grads = [g if g is None else g.requires_grad_(requires_grad) for g in grads]
        torch.library.opcheck(
            torch.ops.fused_lstm.layer_backward,
            (*grads, x, bs, h0, c0, w_ih, w_hh, w_hr, y, gates, cells, reverse),
        )


@pytest.mark.parametrize("proj,bias,packed,reverse", FLAGS)
def test_ops_match_reference(proj, bias, packed, reverse):
    args = op_args(proj, bias, packed, reverse)
    got = torch.ops.fused_lstm.layer_forward(*args)
    want = reference.layer_forward(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    x, bs, h0, c0, w_ih, w_hh, _, _, w_hr, _ = args
    y, hn, cn, gates, cells = want
    grads = (torch.randn_like(y), None, torch.randn_like(cn))
    bargs = (*grads, x, bs, h0, c0, w_ih, w_hh, w_hr, y, gates, cells, reverse)
    for a, b in zip(torch.ops.fused_lstm.layer_backward(*bargs), reference.layer_backward(*bargs)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@needs_extension  # the kernels' own checks; the reference has none of its own
@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda a: {4: torch.randn(4 * H, I + 1, dtype=torch.float64)}, "w_ih must have shape"),
        (lambda a: {2: torch.randn(2, H, dtype=torch.float64)}, "must have shape"),
        (lambda a: {2: a[2].float()}, "h0 must have the dtype of input"),
        (lambda a: {1: torch.tensor([3, 1, 2, 3])}, "batch_sizes must be positive, non-increasing"),
        (lambda a: {6: a[6], 7: None}, "b_ih and b_hh must be given together"),
        # The dispatcher sends a mix of meta and CPU tensors to the fake kernel, not the CPU one.
        (lambda a: {3: a[3].to("meta")}, r"c0 must be on the device of input \(cpu\), got meta"),
    ],
)
def test_op_argument_checks(bad, match):
    with pytest.raises(RuntimeError, match=match):
        call_with(torch.ops.fused_lstm.layer_forward, op_args(False, True, True, False), bad)


# ---- the cell ops: one step, input (B, I), no projection -------------------------------------


def cell_backward_args(args, forward_out, grad_h, grad_c):
    """cell_backward's arguments: the incoming gradients, cell_forward's inputs but the biases,
    and the workspace it returned."""
    _, _, gates, cells = forward_out
    return (grad_h, grad_c, *args[:5], gates, cells)


# Which incoming gradients are defined: both, or one (the other output unused).


def incoming(which, h, c):
    return (
        torch.randn_like(h) if which != "c" else None,
        torch.randn_like(c) if which != "h" else None,
    )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [3, 0])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.backends("cpu", "cuda")
def test_cell_opcheck(bias, batch, requires_grad, backend):
    device = backend.device
    args = cell_args(bias, requires_grad, device, batch)
    torch.library.opcheck(torch.ops.fused_lstm.cell_forward, args)
    with torch.no_grad():
        out = torch.ops.fused_lstm.cell_forward(*args)
    # With requires_grad, this checks cell_backward's registration as non-differentiable.
    for which in CELL_GRADS:
        grads = [
            g if g is None else g.requires_grad_(requires_grad) for g in incoming(which, *out[:2])
        ]
        torch.library.opcheck(
            torch.ops.fused_lstm.cell_backward, cell_backward_args(args, out, *grads)
        )


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [3, 1, 0])
def test_cell_ops_match_reference(bias, batch):
    args = cell_args(bias, batch=batch)
    want = reference.cell_forward(*args)
    got = torch.ops.fused_lstm.cell_forward(*args)
    assert [t.shape for t in got] == [(batch, H), (batch, H), (batch, 4 * H), (batch, H)]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    for which in [*CELL_GRADS, "none"]:
        grads = (None, None) if which == "none" else incoming(which, *want[:2])
        bargs = cell_backward_args(args, want, *grads)
        for a, b in zip(
            torch.ops.fused_lstm.cell_backward(*bargs), reference.cell_backward(*bargs), strict=True
        ):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=which)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cell_ops_in_lower_precision(dtype):
    """Results in the inputs' dtype, close to float64 on the same (rounded) inputs."""
    args = cell_args(dtype=dtype)
    wide = [None if t is None else t.double() for t in args]
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    out = torch.ops.fused_lstm.cell_forward(*args)
    want = reference.cell_forward(*wide)
    for a, b in zip(out, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)
    grads = incoming("both", *out[:2])
    got_b = torch.ops.fused_lstm.cell_backward(*cell_backward_args(args, out, *grads))
    want_b = reference.cell_backward(
        *cell_backward_args(wide, [t.double() for t in out], *(g.double() for g in grads))
    )
    for a, b in zip(got_b, want_b, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, **tol)


@needs_extension  # the kernels' own checks; the reference has none of its own
@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda a: {0: a[0].unsqueeze(0)}, r"input must be \(B, I\), got 3-D"),
        (lambda a: {0: a[0].long()}, "input must be a floating-point tensor"),
        (
            lambda a: {1: a[1][:2]},
            r"h0 must be \(B, H\) with B = input.size\(0\) = 3, got \[2, 5\]",
        ),
        (lambda a: {2: a[2][0]}, r"c0 must be \(B, H\) with B = input.size\(0\) = 3, got \[5\]"),
        (lambda a: {2: torch.randn(3, H + 1, dtype=torch.float64)}, r"c0 must have shape \[3, 5\]"),
        (lambda a: {3: torch.randn(4 * H, I + 1, dtype=torch.float64)}, "w_ih must have shape"),
        (
            lambda a: {4: torch.randn(4 * H + 1, H, dtype=torch.float64)},
            r"w_hh must be \(4\*hidden_size, Hr\)",
        ),
        (lambda a: {1: a[1].float()}, "h0 must have the dtype of input"),
        (lambda a: {6: None}, "b_ih and b_hh must be given together"),
        (lambda a: {5: a[5][:-1]}, r"b_ih must have shape \[20\]"),
        (lambda a: {2: a[2].to("meta")}, r"c0 must be on the device of input \(cpu\), got meta"),
    ],
)
def test_cell_forward_argument_checks(bad, match):
    with pytest.raises(RuntimeError, match=match):
        call_with(torch.ops.fused_lstm.cell_forward, cell_args(), bad)


@needs_extension  # the kernels' own checks; the reference has none of its own
@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda a: {7: a[7][:, :-1]}, r"gates must have shape \[3, 20\], got \[3, 19\]"),
        (lambda a: {8: a[8].t()}, r"cells must have shape \[3, 5\], got \[5, 3\]"),
        (lambda a: {7: a[7].float()}, "gates must have the dtype of input"),
        (lambda a: {0: a[0][:2]}, r"grad_h must have shape \[3, 5\], got \[2, 5\]"),
        (lambda a: {1: a[1].float()}, "grad_c must have the dtype of input"),
        (lambda a: {2: a[2][0]}, r"input must be \(B, I\), got 1-D"),
        (lambda a: {5: a[5].float()}, "w_ih must have the dtype of input"),
        (lambda a: {8: a[8].to("meta")}, r"cells must be on the device of input \(cpu\), got meta"),
    ],
)
def test_cell_backward_argument_checks(bad, match):
    args = cell_args()
    out = torch.ops.fused_lstm.cell_forward(*args)
    bargs = cell_backward_args(args, out, *incoming("both", *out[:2]))
    with pytest.raises(RuntimeError, match=match):
        call_with(torch.ops.fused_lstm.cell_backward, bargs, bad)


# ---- the whole-LSTM op: every layer and direction, nn.LSTM's dropout -----------------------

# num_layers, bidirectional, proj, bias, packed
LSTM_FLAGS = [
    (L, bi, proj, bias, packed)
    for L in (1, 2)
    for bi in (False, True)
    for proj in (False, True)
    for bias in (False, True)
    for packed in (False, True)
]


def vf_lstm(args):
    """aten::lstm (what nn.LSTM calls) on the lstm op's arguments."""
    x, batch_sizes, hx, cx, params, bias, _, num_layers, dropout, train, bi = args
    if batch_sizes is None:
        return torch._VF.lstm(x, (hx, cx), params, bias, num_layers, dropout, train, bi, False)
    return torch._VF.lstm(x, batch_sizes, (hx, cx), params, bias, num_layers, dropout, train, bi)


@pytest.mark.parametrize("num_layers,bidirectional,proj,bias,packed", LSTM_FLAGS)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.backends("cpu", "cuda")
def test_lstm_opcheck(num_layers, bidirectional, proj, bias, packed, requires_grad, backend):
    # opcheck compares several runs of the op, so its dropout must not draw: p = 1 (every unit
    # dropped) exercises the masks without randomness, eval mode skips them.
    device = backend.device
    for dropout, train in ((0.0, True), (1.0, True), (0.5, False)):
        args = lstm_args(
            num_layers, bidirectional, proj, bias, packed, dropout, train, requires_grad, device
        )
        torch.library.opcheck(torch.ops.fused_lstm.lstm, args)


@pytest.mark.parametrize("num_layers,bidirectional,proj,bias,packed", LSTM_FLAGS)
@pytest.mark.parametrize("batch", [3, 1])
def test_lstm_op_matches_aten_lstm(num_layers, bidirectional, proj, bias, packed, batch):
    """Outputs and the gradients of every input against aten::lstm, with one output unused too."""
    args = lstm_args(num_layers, bidirectional, proj, bias, packed, requires_grad=True, batch=batch)
    x, _, hx, cx, params = args[:5]
    leaves = [x, hx, cx, *params]
    for used in ((0, 1, 2), (1,), (2,)):
        results = []
        for f in (torch.ops.fused_lstm.lstm, lambda *a: vf_lstm(a)):
            out = f(*args)
            loss = sum((out[k] * ramp(out[k])).sum() for k in used)
            results.append([*out, *torch.autograd.grad(loss, leaves, allow_unused=True)])
        got, want = results
        # aten::lstm leaves a gradient it does not reach as None, the handwritten backward
        # computes zeros (h_0 of layer 0 is reached from h_n only through the recurrence).
        want = [torch.zeros_like(g) if w is None else w for w, g in zip(want, got)]
        assert_same(want, got, atol=1e-12)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_lstm_op_dropout_matches_aten_lstm(bidirectional, packed):
    """With the same seed, the same masks as aten::lstm on the CPU (torch's generator, drawn
    once per layer but the last, on both directions' output), so the same values and grads."""
    args = lstm_args(
        3, bidirectional, False, True, packed, dropout=0.4, train=True, requires_grad=True
    )
    leaves = [args[0], args[2], args[3], *args[4]]
    results = []
    for f in (torch.ops.fused_lstm.lstm, lambda *a: vf_lstm(a)):
        torch.manual_seed(7)
        out = f(*args)
        loss = (out[0] * ramp(out[0])).sum() + out[1].sum() + out[2].sin().sum()
        results.append([*out, *torch.autograd.grad(loss, leaves)])
    assert_same(*results, atol=1e-12)
    assert not torch.equal(results[0][0], torch.ops.fused_lstm.lstm(*args)[0])  # it does draw


@needs_extension
@pytest.mark.parametrize("num_layers,bidirectional,proj,bias,packed", LSTM_FLAGS)
@pytest.mark.parametrize("train", [True, False])
def test_reference_lstm_composes_like_the_lstm_op(
    num_layers, bidirectional, proj, bias, packed, train
):
    """reference.lstm, the lstm op's kernel in an install without the extension, against the
    C++ op, both on the reference kernels, with dropout, every regulariser and resets: the same
    masks from the same seed, so the same values and gradients."""
    args = lstm_args(
        num_layers, bidirectional, proj, bias, packed, dropout=0.3, train=train, requires_grad=True
    )
    x, _, hx, cx, params = args[:5]
    kw = dict(
        reset=torch.rand(x.shape[:-1]) < 0.3,
        recurrent_dropout=0.2,
        zoneout_cell=0.1,
        zoneout_hidden=0.2,
        weight_drop=0.3,
    )
    results = []
    for f in (torch.ops.fused_lstm.lstm, reference.lstm):
        torch.manual_seed(5)
        with fused_lstm.reference_only():
            out = f(*args, **kw)
            loss = (out[0] * ramp(out[0])).sum() + out[1].sum() + out[2].sin().sum()
            results.append([*out, *torch.autograd.grad(loss, [x, hx, cx, *params])])
    assert_same(results[0][:3], results[1][:3], atol=0)
    assert_same(results[0][3:], results[1][3:], atol=1e-13)


def test_lstm_op_without_grad_keeps_no_graph_and_matches():
    """Nothing requiring grad: no graph, the same values as with one."""
    args = lstm_args(2, True, True, True, False)
    with torch.no_grad():
        plain = torch.ops.fused_lstm.lstm(*args)
    tracked = list(args)
    for k in (0, 2, 3):
        tracked[k] = args[k].clone().requires_grad_()
    tracked[4] = [p.clone().requires_grad_() for p in args[4]]
    tracked = torch.ops.fused_lstm.lstm(*tracked)
    assert all(t.grad_fn is None for t in plain)
    assert all(t.grad_fn is not None for t in tracked)
    assert_same(list(plain), list(tracked), atol=0)


@needs_extension  # the kernels' own checks; the reference has none of its own
@pytest.mark.parametrize(
    "bad,match",
    [
        (
            lambda a: {4: a[4][:-1]},
            r"params must hold 4 tensors per layer and direction \(16 in all",
        ),
        (lambda a: {6: True}, r"params must hold 5 tensors per layer and direction"),
        (
            lambda a: {2: a[2][:3]},
            r"hx must be \(num_layers \* num_directions = 4, B, Hr\), got "
            r"\[3, 3, 5\]",
        ),
        (lambda a: {3: a[3][0]}, r"cx must be \(num_layers \* num_directions = 4, B, H\)"),
        (lambda a: {7: 0}, "num_layers must be positive, got 0"),
        (lambda a: {8: 1.5}, r"dropout must be in \[0, 1\], got 1.5"),
        (lambda a: {2: a[2][:, :2]}, r"cx must have the batch size of hx \(2\), got 3"),
        (
            lambda a: {2: a[2][:, :2], 3: a[3][:, :2]},
            r"hx must have input.size\(1\) = 3 rows, got 2",
        ),
        (lambda a: {4: [a[4][0].float(), *a[4][1:]]}, "w_ih must have the dtype of input"),
        (lambda a: {0: a[0][0]}, r"input must be \(T, B, I\) without batch_sizes, got 2-D"),
    ],
)
def test_lstm_op_argument_checks(bad, match):
    with pytest.raises(RuntimeError, match=match):
        call_with(torch.ops.fused_lstm.lstm, lstm_args(2, True, False, True, False), bad)


def test_lstm_op_on_fake_tensors():
    """Below autograd, on fake tensors (as torch.compile and torch.export call it): the shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = lstm_args(2, True, True, True, True)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake[4] = [mode.from_tensor(p) for p in args[4]]
        with torch._C._AutoDispatchBelowAutograd():
            out, h_n, c_n = torch.ops.fused_lstm.lstm(*fake)
    assert out.shape == (args[0].shape[0], 2 * P) and h_n.shape == (4, 3, P)
    assert c_n.shape == (4, 3, H)


PY_AUTOGRAD = "fused_lstm_pyautograd"


@functools.cache
def python_autograd_ops():
    """The kernel ops again, in a namespace of their own, with the native kernels and the Python
    autograd that an install without the extension registers for the fused_lstm ops."""
    from fused_lstm import _library

    _library.define(PY_AUTOGRAD, _library.KERNEL_OPS)
    for name in _library.KERNEL_OPS:
        torch.library.impl(f"{PY_AUTOGRAD}::{name}", "CompositeExplicitAutograd")(
            getattr(torch.ops.fused_lstm, name)
        )
    _library.register_python_autograd(PY_AUTOGRAD)
    return getattr(torch.ops, PY_AUTOGRAD)


def grads_through(op, args, which):
    """op's outputs and the gradients of a fixed loss of the outputs ``which`` selects, for each
    tensor argument (None where it gets none); then whether a second backward raises, and
    its message."""
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    out = op(*args)
    loss = sum((o * ramp(o)).sum() for k, o in enumerate(out) if k in which)
    grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
    second = next(g for g in grads if g is not None)
    with pytest.raises(RuntimeError) as err:
        torch.autograd.grad(second.sum(), inputs, allow_unused=True)
    return out, grads, str(err.value)


@needs_extension
@pytest.mark.parametrize("proj,bias,packed,reverse", FLAGS)
@pytest.mark.parametrize("which", [(0,), (1, 2), (0, 2)])
def test_python_autograd_matches_the_cpp_one(proj, bias, packed, reverse, which):
    """The two autograds of the kernel ops (csrc/autograd/kernel_ops.cpp and _library.py's, over
    the same native kernels) give the same outputs and gradients, bit for bit, leave the same
    arguments without one, and refuse a second backward alike."""
    args = op_args(proj, bias, packed, reverse, requires_grad=True)
    for cpp, py in (
        (torch.ops.fused_lstm.layer_forward, python_autograd_ops().layer_forward),
        (torch.ops.fused_lstm.cell_forward, python_autograd_ops().cell_forward),
    ):
        call = (
            args
            if cpp is torch.ops.fused_lstm.layer_forward
            else cell_args(bias, requires_grad=True)
        )
        out_cpp, grads_cpp, err_cpp = grads_through(cpp, call, which)
        out_py, grads_py, err_py = grads_through(py, call, which)
        assert_same(out_cpp, out_py, atol=0)
        assert [g is None for g in grads_cpp] == [g is None for g in grads_py]
        assert_same(
            [g for g in grads_cpp if g is not None], [g for g in grads_py if g is not None], atol=0
        )
        assert err_cpp == err_py == fused_lstm._library.DOUBLE_BACKWARD_ERROR

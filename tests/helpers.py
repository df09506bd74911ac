"""Shared by the tests: run nn.LSTM and FusedLSTM on the same input, compare everything."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fused_lstm
from fused_lstm.testing import emulator_built

# For the tests that need a backend without running per backend (streams, autocast, the
# emulator's own tests), and for the backend fixture's own skips: skipped, never removed,
# where the install or the machine lacks it.
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in fused_lstm.native_backends(),
    reason="needs a GPU and the CUDA kernels",
)
needs_emulator = pytest.mark.skipif(
    not emulator_built() or "cpu" not in fused_lstm.native_backends(),
    reason="needs the CUDA emulator (install with FUSED_LSTM_BUILD_EMULATOR=1) and the extension",
)
# What only the compiled extension has (its constants, its C++ autograd's errors): skipped in an
# install without it (FUSED_LSTM_NO_EXTENSION=1), where everything else runs on the reference.
needs_extension = pytest.mark.skipif(
    "cpu" not in fused_lstm.native_backends(), reason="needs the compiled extension fused_lstm._C"
)


def outputs_and_grads(module, inp, hx, leaves):
    out, (h, c) = module(inp, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    # A loss that weights every output differently, so a mix-up of rows or units shows.
    loss = (data * ramp(data)).sum() + (h * h).sum() + c.sin().sum()
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [*leaves, *params], allow_unused=True)
    return [data, h, c, *grads]


def cell_outputs_and_grads(cell, inp, hx, leaves):
    """The same for a cell: h, c and the gradients of a loss of both."""
    h, c = cell(inp, hx)
    loss = (h * ramp(h)).sum() + c.sin().sum()
    return [h, c, *torch.autograd.grad(loss, [*leaves, *cell.parameters()])]


def ramp(t):
    return torch.linspace(-1, 1, t.numel(), dtype=t.dtype, device=t.device).view_as(t)


def assert_same(ref_vals, got_vals, atol, rtol=0.0, equal_nan=False):
    assert len(ref_vals) == len(got_vals)
    for k, (a, b) in enumerate(zip(ref_vals, got_vals)):
        assert (a is None) == (b is None), k
        if a is None:
            continue
        assert a.shape == b.shape, (k, a.shape, b.shape)
        assert a.dtype == b.dtype, (k, a.dtype, b.dtype)
        torch.testing.assert_close(
            b, a, atol=atol, rtol=rtol, equal_nan=equal_nan, msg=lambda m: f"item {k}: {m}"
        )


# ---- the ops' arguments (test_ops, test_gradcheck): float64, at these sizes ------------------

I, H, P = 3, 5, 2


def op_args(proj, bias, packed, reverse, requires_grad=False, device="cpu"):
    dt = {"dtype": torch.float64, "requires_grad": requires_grad, "device": device}
    Hr = P if proj else H
    if packed:
        batch_sizes = torch.tensor([3, 3, 2, 1])  # on the CPU whatever the device, as in nn.LSTM
        x = torch.randn(int(batch_sizes.sum()), I, **dt)
    else:
        batch_sizes, x = None, torch.randn(4, 3, I, **dt)
    return (
        x,
        batch_sizes,
        torch.randn(3, Hr, **dt),
        torch.randn(3, H, **dt),
        torch.randn(4 * H, I, **dt),
        torch.randn(4 * H, Hr, **dt),
        torch.randn(4 * H, **dt) if bias else None,
        torch.randn(4 * H, **dt) if bias else None,
        torch.randn(Hr, H, **dt) if proj else None,
        reverse,
    )


FLAGS = [
    (proj, bias, packed, reverse)
    for proj in (False, True)
    for bias in (False, True)
    for packed in (False, True)
    for reverse in (False, True)
]


def cell_args(bias=True, requires_grad=False, device="cpu", batch=3, dtype=torch.float64):
    dt = {"dtype": dtype, "requires_grad": requires_grad, "device": device}
    return (
        torch.randn(batch, I, **dt),
        torch.randn(batch, H, **dt),
        torch.randn(batch, H, **dt),
        torch.randn(4 * H, I, **dt),
        torch.randn(4 * H, H, **dt),
        torch.randn(4 * H, **dt) if bias else None,
        torch.randn(4 * H, **dt) if bias else None,
    )


CELL_GRADS = ["both", "h", "c"]


def lstm_args(
    num_layers,
    bidirectional,
    proj,
    bias,
    packed,
    dropout=0.0,
    train=False,
    requires_grad=False,
    device="cpu",
    batch=3,
):
    """The lstm op's arguments, with nn.LSTM's parameters (shapes, order, initialisation)."""
    ref = nn.LSTM(
        I,
        H,
        num_layers,
        bias,
        bidirectional=bidirectional,
        proj_size=P if proj else 0,
        dtype=torch.float64,
        device=device,
    )
    params = [p.detach().clone().requires_grad_(requires_grad) for p in ref._flat_weights]
    dt = {"dtype": torch.float64, "requires_grad": requires_grad, "device": device}
    D = 2 if bidirectional else 1
    if packed:
        batch_sizes = torch.tensor([batch, batch, 2, 1][: 4 if batch >= 2 else 1])
        x = torch.randn(int(batch_sizes.sum()), I, **dt)
    else:
        batch_sizes, x = None, torch.randn(4, batch, I, **dt)
    hx = torch.randn(num_layers * D, batch, P if proj else H, **dt)
    cx = torch.randn(num_layers * D, batch, H, **dt)
    return (x, batch_sizes, hx, cx, params, bias, proj, num_layers, dropout, train, bidirectional)


# ---- nn.LSTM against FusedLSTM, the CUDA kernels' parity tests (test_parity, test_edge_inputs,
# test_cuda_kernels): a fixed random loss of every output, the gradients of every input --------

LSTM_I, LSTM_H, LENGTHS = 4, 6, [5, 3, 2]


def make_lstm(
    dev,
    num_layers=1,
    bias=True,
    batch_first=False,
    bidirectional=False,
    proj_size=0,
    dtype=torch.float32,
    seed=0,
    hidden=LSTM_H,
):
    torch.manual_seed(seed)
    return nn.LSTM(
        LSTM_I,
        hidden,
        num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        proj_size=proj_size,
    ).to(dev, dtype)


def make_inputs(lstm: nn.LSTM, dtype, seed=1, with_hx=True, steps=5, batch=3):
    g = torch.Generator().manual_seed(seed)
    D = 2 if lstm.bidirectional else 1
    Hr = lstm.proj_size or lstm.hidden_size
    dev = lstm.weight_hh_l0.device
    shape = (batch, steps, LSTM_I) if lstm.batch_first else (steps, batch, LSTM_I)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    hx = None
    if with_hx:
        hx = (
            torch.randn(lstm.num_layers * D, batch, Hr, generator=g, dtype=torch.float64),
            torch.randn(
                lstm.num_layers * D, batch, lstm.hidden_size, generator=g, dtype=torch.float64
            ),
        )
        hx = tuple(t.to(dev, dtype).requires_grad_() for t in hx)
    return x.to(dev, dtype).requires_grad_(), hx


def run_lstm(module, x, hx, packed=None, seed=2):
    """Output, h_n, c_n and the gradients of a fixed random loss w.r.t. x, h0, c0 and every
    parameter. packed: None, "sorted", "unsorted" (x is then padded, lengths LENGTHS) or a list
    of lengths (sorted)."""
    inp = x
    if packed is not None:
        lengths = (
            packed
            if isinstance(packed, list)
            else {"sorted": LENGTHS, "unsorted": [LENGTHS[1], LENGTHS[0], LENGTHS[2]]}[packed]
        )
        inp = pack_padded_sequence(
            x,
            torch.tensor(lengths),
            batch_first=module.batch_first,
            enforce_sorted=packed != "unsorted",
        )
    out, (h, c) = module(inp, hx)
    data = out.data if packed is not None else out
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device)).sum()
        for t in (data, h, c)
    )
    wrt = [x] + ([] if hx is None else list(hx)) + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt)
    return [data.detach(), h.detach(), c.detach(), *grads]


def grad_names(module, with_hx):
    return (
        ["output", "h_n", "c_n", "grad_input"]
        + (["grad_h0", "grad_c0"] if with_hx else [])
        + [f"grad_{n}" for n, _ in module.named_parameters()]
    )


def compare(got, want, names, atol, rtol):
    for a, b, name in zip(got, want, names, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


def load_script(name):
    """benchmarks/<name>.py as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module

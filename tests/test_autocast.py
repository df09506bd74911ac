"""CPU autocast: FusedLSTM and FusedLSTMCell compute in the dtype nn.LSTM and nn.LSTMCell compute
in under ``torch.autocast("cpu")`` and return what they return, on every CPU backend, and no
product inside the kernels is recast by autocast. (CUDA autocast: tests/test_cuda_kernels.py.)

nn.LSTM under CPU autocast computes padded input in the autocast dtype (autocast's list holds
aten::lstm's padded overload) and a PackedSequence in its own dtype; nn.LSTMCell stays in its own.
In float16 nn.LSTM fails on CPUs whose oneDNN has no float16 LSTM, so where it fails the values
are held to a float64 computation from the same float16 inputs and weights instead."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from fused_lstm import FusedLSTM, FusedLSTMCell
from helpers import ramp

# (T, B, I, H): the lectures' sizes, where a CPU call's products are loops, and one where they
# are GEMMs (oneDNN or MKL).
SIZES = {"seed": (11, 3, 6, 10), "gemm": (50, 16, 64, 128)}
# (num_layers, bidirectional, proj_size, bias, batch_first)
CONFIGS = [
    (1, False, 0, True, False),
    (2, True, 0, True, True),
    (2, False, 4, False, False),
    (1, True, 3, True, False),
]
DTYPES = [torch.bfloat16, torch.float16]


def run(module, x, hx, dtype, train):
    """module(x, hx) under CPU autocast to dtype (None: without autocast), and with train a
    backward of a fixed loss; returns the outputs as float64 (PackedSequence data for packed
    input), their dtypes, and the parameters' gradients."""
    module.zero_grad(set_to_none=True)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)
    with autocast, torch.set_grad_enabled(train):
        out, (h_n, c_n) = module(x, hx)
    out = out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out
    outs = (out, h_n, c_n)
    if train:
        sum((o.double() * ramp(o.double())).sum() for o in outs).backward()
    grads = [p.grad for p in module.parameters()] if train else []
    return [o.double() for o in outs], [o.dtype for o in outs], grads


def inputs(size, batch_first, packed, D, L, Hr, H):
    T, B, I, _ = size
    x = torch.randn(B, T, I) if batch_first else torch.randn(T, B, I)
    hx = (torch.randn(L * D, B, Hr), torch.randn(L * D, B, H))
    if packed:
        lengths = torch.linspace(T, 1, B).long()
        x = pack_padded_sequence(x, lengths, batch_first=batch_first)
    return x, hx


def rounded(x, hx, dtype):
    """The inputs as autocast hands them to the products: rounded to dtype, then float64."""
    if isinstance(x, nn.utils.rnn.PackedSequence):
        x = x._replace(data=x.data.to(dtype).double())
    else:
        x = x.to(dtype).double()
    return x, tuple(h.to(dtype).double() for h in hx)


def dtypes_of_nn_lstm(dtype, packed, proj):
    """(compute, returned): what nn.LSTM computes in under CPU autocast to dtype, from float32
    input, and the dtypes of its output, h_n and c_n (see modules._autocast_dtype)."""
    if proj:
        return torch.float32, [dtype, dtype, torch.float32]
    compute = torch.float32 if packed else dtype
    return compute, [compute] * 3


def check_lstm(size, num_layers, bidirectional, proj_size, bias, batch_first, packed, dtype, train):
    I, H = SIZES[size][2], SIZES[size][3]
    ref = nn.LSTM(I, H, num_layers, bias, batch_first, 0.0, bidirectional, proj_size)
    fused = FusedLSTM.from_lstm(ref)
    D, Hr = 2 if bidirectional else 1, proj_size or H
    x, hx = inputs(SIZES[size], batch_first, packed, D, num_layers, Hr, H)
    compute, want_dtypes = dtypes_of_nn_lstm(dtype, packed, proj_size > 0)

    got, got_dtypes, got_grads = run(fused, x, hx, dtype, train)
    assert got_dtypes == want_dtypes
    assert all(g is not None and g.dtype == torch.float32 for g in got_grads)

    # float64 from the inputs and weights as the products see them.
    exact = nn.LSTM(I, H, num_layers, bias, batch_first, 0.0, bidirectional, proj_size)
    exact.load_state_dict({k: v.to(compute) for k, v in ref.state_dict().items()})
    want, _, want_grads = run(exact.double(), *rounded(x, hx, compute), None, train)
    # One unit in the last place of each result's dtype at its magnitude.
    ulps = [torch.finfo(d).eps * max(1.0, w.abs().max().item()) for d, w in zip(want_dtypes, want)]
    grad_ulp = torch.finfo(compute).eps
    try:
        nn_out, nn_dtypes, nn_grads = run(ref, x, hx, dtype, train)
    except RuntimeError as err:  # oneDNN without a float16 LSTM on this CPU
        assert dtype == torch.float16 and "primitive" in str(err), err
        nn_out = None
    if nn_out is not None:
        # What nn.LSTM does, which dtypes_of_nn_lstm states, and within twice its error (plus an
        # ulp, for where nn.LSTM's error happens to be near zero).
        assert nn_dtypes == want_dtypes
        for g, n, w, ulp in zip(got, nn_out, want, ulps, strict=True):
            assert (g - w).abs().max() <= 2 * (n - w).abs().max() + ulp
        for g, n, w in zip(got_grads, nn_grads, want_grads, strict=True):
            err, nn_err = (g.double() - w).abs().max(), (n.double() - w).abs().max()
            assert err <= 2 * nn_err + grad_ulp * max(1.0, w.abs().max().item())
    else:
        # Float32 arithmetic on float16 storage: the rounding of the saved activations and of
        # the results.
        for g, w, ulp in zip(got, want, ulps, strict=True):
            assert (g - w).abs().max() <= 2 * ulp
        for g, w in zip(got_grads, want_grads, strict=True):
            assert (g.double() - w).norm() <= 40 * grad_ulp * w.norm() + 1e-6


# (num_layers, bidirectional, proj_size, bias, batch_first, packed)
FLAGS = pytest.mark.parametrize(
    "flags", [(*c, packed) for c in CONFIGS for packed in (False, True)], ids=str
)


@pytest.mark.backends("reference", "cpu", "emulated_cuda")
@FLAGS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_lstm_under_cpu_autocast_like_nn_lstm(backend, flags, dtype, train):
    check_lstm("seed", *flags, dtype=dtype, train=train)


@pytest.mark.backends("reference", "cpu")  # the emulator runs the CUDA kernels at seed sizes
@FLAGS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_lstm_under_cpu_autocast_like_nn_lstm_at_gemm_sizes(backend, flags, dtype, train):
    check_lstm("gemm", *flags, dtype=dtype, train=train)


@pytest.mark.backends("reference", "cpu", "emulated_cuda")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("train", [False, True])
def test_cell_under_cpu_autocast_stays_in_its_dtype(backend, dtype, train):
    """nn.LSTMCell under CPU autocast computes in float32; FusedLSTMCell gives the bits it gives
    without autocast."""
    ref = nn.LSTMCell(6, 10)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x, hx = torch.randn(3, 6), (torch.randn(3, 10), torch.randn(3, 10))
    with torch.autocast("cpu", dtype=dtype):
        assert [t.dtype for t in ref(x, hx)] == [torch.float32] * 2
        with torch.set_grad_enabled(train):
            h, c = fused(x, hx)
    with torch.set_grad_enabled(train):
        h_plain, c_plain = fused(x, hx)
    assert h.dtype == c.dtype == torch.float32
    assert torch.equal(h, h_plain) and torch.equal(c, c_plain)
    if train:
        (h * ramp(h)).sum().backward()
        grads = [p.grad.clone() for p in fused.parameters()]
        fused.zero_grad(set_to_none=True)
        (h_plain * ramp(h_plain)).sum().backward()
        for g, p in zip(grads, fused.parameters(), strict=True):
            assert torch.equal(g, p.grad)

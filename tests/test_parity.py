"""FusedLSTM against nn.LSTM with copied weights, float64, tight tolerance: values and gradients,
on every flag combination, on the native CPU kernel and on the reference; on the CUDA kernels
(emulated, and on a GPU) against nn.LSTM there. The same for FusedLSTMCell and for the cell ops
themselves against nn.LSTMCell. Property-based: random configurations, input forms, sizes and
scales against nn.LSTM."""

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

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

T, B, I, H, P = 5, 3, 4, 6, 3
ATOL = 1e-9
GRID = list(
    itertools.product([1, 2, 3], [True, False], [True, False], [False, True], [0, P], [True, False])
)


def make_pair(**kw):
    ref = nn.LSTM(I, H, dtype=torch.float64, **kw)
    return ref, FusedLSTM.from_lstm(ref)


def states(ref, batch, batched=True):
    D = 2 if ref.bidirectional else 1
    Hr = ref.proj_size or H
    lead = (ref.num_layers * D, batch) if batched else (ref.num_layers * D,)
    return (
        torch.randn(*lead, Hr, dtype=torch.float64, requires_grad=True),
        torch.randn(*lead, H, dtype=torch.float64, requires_grad=True),
    )


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,proj_size,with_hx", GRID)
def test_batched(backend, num_layers, bias, batch_first, bidirectional, proj_size, with_hx):
    ref, fused = make_pair(
        num_layers=num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = states(ref, B) if with_hx else None
    leaves = [x, *(hx or ())]
    assert_same(
        outputs_and_grads(ref, x, hx, leaves), outputs_and_grads(fused, x, hx, leaves), atol=ATOL
    )


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize(
    "bidirectional,proj_size,with_hx", list(itertools.product([False, True], [0, P], [True, False]))
)
def test_unbatched(backend, bidirectional, proj_size, with_hx):
    ref, fused = make_pair(num_layers=2, bidirectional=bidirectional, proj_size=proj_size)
    x = torch.randn(T, I, dtype=torch.float64, requires_grad=True)
    hx = states(ref, 1, batched=False) if with_hx else None
    leaves = [x, *(hx or ())]
    ref_vals = outputs_and_grads(ref, x, hx, leaves)
    assert ref_vals[0].shape == (T, (2 if bidirectional else 1) * (proj_size or H))
    assert_same(ref_vals, outputs_and_grads(fused, x, hx, leaves), atol=ATOL)


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize(
    "enforce_sorted,bidirectional,proj_size,with_hx,batch_first",
    list(itertools.product([True, False], [False, True], [0, P], [True, False], [False, True])),
)
def test_packed(backend, enforce_sorted, bidirectional, proj_size, with_hx, batch_first):
    ref, fused = make_pair(
        num_layers=2, bidirectional=bidirectional, proj_size=proj_size, batch_first=batch_first
    )
    lengths = torch.tensor([7, 5, 5, 2] if enforce_sorted else [3, 7, 1, 5])
    shape = (4, 7, I) if batch_first else (7, 4, I)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    hx = states(ref, 4) if with_hx else None
    leaves = [x, *(hx or ())]

    def run(module):
        packed = pack_padded_sequence(
            x, lengths, batch_first=batch_first, enforce_sorted=enforce_sorted
        )
        return outputs_and_grads(module, packed, hx, leaves)

    assert_same(run(ref), run(fused), atol=ATOL)


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize(
    "bias,batched,with_hx", list(itertools.product([True, False], [True, False], [True, False]))
)
def test_cell(backend, bias, batched, with_hx):
    ref = nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    lead = (B,) if batched else ()
    x = torch.randn(*lead, I, dtype=torch.float64, requires_grad=True)
    hx = (
        (
            torch.randn(*lead, H, dtype=torch.float64, requires_grad=True),
            torch.randn(*lead, H, dtype=torch.float64, requires_grad=True),
        )
        if with_hx
        else None
    )
    leaves = [x, *(hx or ())]

    assert_same(
        cell_outputs_and_grads(ref, x, hx, leaves),
        cell_outputs_and_grads(fused, x, hx, leaves),
        atol=ATOL,
    )


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("used", ["both", "h", "c"])
def test_cell_ops_match_nn_lstm_cell(backend, bias, used):
    """cell_forward's h and c, and cell_backward's gradients of input, h0, c0 and every weight
    for given incoming gradients (None for an unused output), against nn.LSTMCell's autograd."""
    namespace = backend.ops
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
            grad_h, grad_c, x, h0, c0, *params[:2], gates, cells
        )
    got = [got_h, got_c, dx, dh0, dc0, dw_ih, dw_hh, *((db, db) if bias else ())]
    assert_same([t.detach() for t in want], got, atol=ATOL)


@pytest.mark.backends("reference", "cpu")
def test_only_c_n_used(backend):
    """Undefined incoming gradients: only c_n feeds the loss, output and h_n get none."""
    ref, fused = make_pair(num_layers=2, bidirectional=True)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    grads = []
    for m in (ref, fused):
        _, (_, c) = m(x)
        grads.append(torch.autograd.grad(c.sum(), [x, *m.parameters()]))
    assert_same(grads[0], grads[1], atol=ATOL)


@pytest.mark.backends("reference", "cpu")
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


@pytest.mark.backends("reference", "cpu")
def test_float32_close_to_nn_lstm(backend):
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(T, B, I, requires_grad=True)
    assert_same(
        outputs_and_grads(ref, x, None, [x]),
        outputs_and_grads(fused, x, None, [x]),
        atol=2e-5,
        rtol=1e-4,
    )


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("hidden", [1, 2, 4, 17, 20, 33, 64, 130])
def test_sizes_across_vector_widths(backend, hidden):
    """Hidden sizes below, at and across the kernels' 4-, 8- and 16-wide vector blocks."""
    for dtype, atol in ((torch.float64, ATOL), (torch.float32, 3e-5)):
        ref = nn.LSTM(3, hidden, dtype=dtype)
        fused = FusedLSTM.from_lstm(ref)
        x = torch.randn(9, 2, 3, dtype=dtype, requires_grad=True)
        assert_same(
            outputs_and_grads(ref, x, None, [x]),
            outputs_and_grads(fused, x, None, [x]),
            atol=atol,
            rtol=1e-4 if dtype == torch.float32 else 0,
        )


# ---- the CUDA kernels against nn.LSTM: against cuDNN on a GPU, ATen's CPU LSTM under the
# emulator ----------------------------------------------------------------------------------------


KERNEL_GRID = list(
    itertools.product([1, 2], [True, False], [False, True], [False, True], [0, P], [True, False])
)


def _grid_id(p):
    layers, bias, bf, bidir, proj, with_hx = p
    return f"L{layers}-bias{int(bias)}-bf{int(bf)}-bi{int(bidir)}-proj{proj}-hx{int(with_hx)}"


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("params", KERNEL_GRID, ids=_grid_id)
def test_float32_matches_nn_lstm(backend, params):
    """Against cuDNN on a GPU, ATen's CPU LSTM under the emulator."""
    dev = backend.device
    layers, bias, bf, bidir, proj, with_hx = params
    lstm = make_lstm(dev, layers, bias, bf, bidir, proj)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = make_inputs(lstm, torch.float32, with_hx=with_hx)
    want = run_lstm(lstm, x, hx)
    got = run_lstm(fused, x, hx)
    compare(got, want, grad_names(lstm, with_hx), atol=1e-5, rtol=1e-5)


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("params", KERNEL_GRID, ids=_grid_id)
def test_float64_matches_native_lstm(backend, params):
    dev = backend.device
    layers, bias, bf, bidir, proj, with_hx = params
    lstm = make_lstm(dev, layers, bias, bf, bidir, proj, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = make_inputs(lstm, torch.float64, with_hx=with_hx)
    with torch.backends.cudnn.flags(enabled=False):
        want = run_lstm(lstm, x, hx)
    got = run_lstm(fused, x, hx)
    compare(got, want, grad_names(lstm, with_hx), atol=1e-9, rtol=1e-7)


PACKED = list(
    itertools.product(["sorted", "unsorted"], [1, 2], [False, True], [0, P], [False, True])
)


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("packed,layers,bidir,proj,bf", PACKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_sequence(backend, packed, layers, bidir, proj, bf, dtype):
    dev = backend.device
    lstm = make_lstm(dev, layers, True, bf, bidir, proj, dtype=dtype)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = make_inputs(lstm, dtype)
    with torch.backends.cudnn.flags(enabled=dtype == torch.float32):
        want = run_lstm(lstm, x, hx, packed)
    got = run_lstm(fused, x, hx, packed)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-7)
    compare(got, want, grad_names(lstm, True), **tol)


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("proj", [0, P])
@pytest.mark.parametrize("with_hx", [True, False])
def test_unbatched_input(backend, proj, with_hx):
    dev = backend.device
    lstm = make_lstm(dev, 2, True, False, True, proj, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = make_inputs(lstm, torch.float64, with_hx=with_hx, batch=1)
    x = x.detach().squeeze(1).requires_grad_()
    if hx is not None:
        hx = tuple(t.detach().squeeze(1).requires_grad_() for t in hx)
    want = run_lstm(lstm, x, hx)
    got = run_lstm(fused, x, hx)
    compare(got, want, grad_names(lstm, with_hx), atol=1e-9, rtol=1e-7)


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "bidir,proj,packed",
    [(False, 0, None), (True, P, None), (True, 0, "unsorted"), (False, P, "sorted")],
)
def test_low_precision_error_within_nn_lstm_error(backend, dtype, bidir, proj, packed):
    """Errors against a float64 reference within 3x nn.LSTM's own error at this precision
    (cuDNN for float16 on a GPU, ATen's native path otherwise), plus one ulp of absolute
    slack."""
    dev = backend.device
    lstm64 = make_lstm(dev, 2, True, False, bidir, proj, dtype=torch.float64)
    x64, hx64 = make_inputs(lstm64, torch.float64)
    with torch.backends.cudnn.flags(enabled=False):
        ref = run_lstm(lstm64, x64, hx64, packed)
    lstm_lp = make_lstm(dev, 2, True, False, bidir, proj, dtype=torch.float64).to(dtype)
    lstm_lp.load_state_dict(lstm64.state_dict())
    fused_lp = FusedLSTM.from_lstm(lstm_lp)
    x, hx = make_inputs(lstm_lp, dtype)
    theirs = run_lstm(lstm_lp, x, hx, packed)
    ours = run_lstm(fused_lp, x, hx, packed)
    floor = torch.finfo(dtype).eps
    for name, r, t, o in zip(grad_names(lstm64, True), ref, theirs, ours, strict=True):
        err_t = (t.double() - r).abs().max().item()
        err_o = (o.double() - r).abs().max().item()
        assert err_o <= 3 * err_t + floor, f"{name}: ours {err_o:.3g}, nn.LSTM {err_t:.3g}"


CELL_GRID = list(itertools.product([True, False], [True, False], [True, False]))


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias,batched,with_hx", CELL_GRID)
def test_cell_matches_nn_lstm_cell(backend, dtype, bias, batched, with_hx):
    dev = backend.device
    torch.manual_seed(0)
    cell = nn.LSTMCell(I, H, bias=bias).to(dev, dtype)
    fused = FusedLSTMCell.from_lstm_cell(cell)
    lead = (B,) if batched else ()
    like = dict(device=dev, dtype=dtype, requires_grad=True)
    x = torch.randn(*lead, I, **like)
    hx = (torch.randn(*lead, H, **like), torch.randn(*lead, H, **like)) if with_hx else None
    wrt = [x, *(hx or ())]
    names = [
        "h",
        "c",
        "grad_input",
        *(["grad_h0", "grad_c0"] if with_hx else []),
        *(f"grad_{n}" for n, _ in cell.named_parameters()),
    ]

    def run(module):
        h, c = module(x, hx)
        g = torch.Generator().manual_seed(2)
        loss = sum(
            (t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dev)).sum()
            for t in (h, c)
        )
        return [h.detach(), c.detach(), *torch.autograd.grad(loss, [*wrt, *module.parameters()])]

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-7)
    compare(run(fused), run(cell), names, **tol)


# ---- property-based: random configurations, input forms, sizes, scales and inputs ----------
#
# Hypothesis draws the configuration and a seed; the tensors come from the seed (drawing them
# element by element would be slow and shrink poorly). derandomize=True: CI runs the same
# examples every time.

F64 = torch.float64
# The backend fixture (and conftest's seeding) wrap all examples of a test, which is intended.
SETTINGS = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
# Saturated gates (large inputs or weights) make big gradients: relative tolerance as well.
TOL = dict(atol=1e-9, rtol=1e-9)
FORMS = ["batched", "unbatched", "packed_sorted", "packed_unsorted"]


@st.composite
def lstm_cases(draw):
    hidden = draw(st.integers(1, 6))
    num_layers = draw(st.integers(1, 3))
    config = dict(
        input_size=draw(st.integers(1, 5)),
        hidden_size=hidden,
        num_layers=num_layers,
        bias=draw(st.booleans()),
        batch_first=draw(st.booleans()),
        bidirectional=draw(st.booleans()),
        proj_size=draw(st.integers(0, hidden - 1)),
        # Applied only in training mode: these modules run in eval mode when it is set.
        dropout=draw(st.sampled_from([0.0, 0.5])) if num_layers > 1 else 0.0,
    )
    form = draw(st.sampled_from(FORMS))
    steps, batch = draw(st.integers(1, 6)), draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
    return dict(
        config=config,
        form=form,
        steps=steps,
        batch=batch,
        lengths=lengths,
        with_hx=draw(st.booleans()),
        input_scale=draw(st.sampled_from([0.1, 1.0, 6.0])),
        weight_scale=draw(st.sampled_from([0.5, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def scaled_pair(ref_cls, fused_from, config, weight_scale, seed):
    torch.manual_seed(seed)
    ref = ref_cls(**config, dtype=F64)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(weight_scale)
    return ref, fused_from(ref)


@pytest.mark.backends("reference", "cpu")
@settings(max_examples=200, **SETTINGS)
@given(case=lstm_cases())
def test_fused_lstm_matches_nn_lstm(backend, case):
    config, form = case["config"], case["form"]
    ref, fused = scaled_pair(
        nn.LSTM, FusedLSTM.from_lstm, config, case["weight_scale"], case["seed"]
    )
    if config["dropout"]:
        ref.eval(), fused.eval()
    T, B = case["steps"], case["batch"]
    shape = (
        (T, config["input_size"])
        if form == "unbatched"
        else (B, T, config["input_size"])
        if config["batch_first"]
        else (T, B, config["input_size"])
    )
    x = (torch.randn(shape, dtype=F64) * case["input_scale"]).requires_grad_()
    hx = None
    if case["with_hx"]:
        D = 2 if config["bidirectional"] else 1
        lead = (config["num_layers"] * D,) + (() if form == "unbatched" else (B,))
        hx = (
            torch.randn(
                *lead, config["proj_size"] or config["hidden_size"], dtype=F64, requires_grad=True
            ),
            torch.randn(*lead, config["hidden_size"], dtype=F64, requires_grad=True),
        )
    leaves = [x, *(hx or ())]

    def run(module):
        inp = x
        if form.startswith("packed"):
            lengths = case["lengths"]
            if form == "packed_sorted":
                lengths = sorted(lengths, reverse=True)
            inp = pack_padded_sequence(
                x,
                torch.tensor(lengths),
                batch_first=config["batch_first"],
                enforce_sorted=form == "packed_sorted",
            )
        return outputs_and_grads(module, inp, hx, leaves)

    assert_same(run(ref), run(fused), **TOL)


@st.composite
def cell_cases(draw):
    return dict(
        config=dict(
            input_size=draw(st.integers(1, 5)),
            hidden_size=draw(st.integers(1, 6)),
            bias=draw(st.booleans()),
        ),
        batch=draw(st.one_of(st.none(), st.integers(1, 4))),
        with_hx=draw(st.booleans()),
        input_scale=draw(st.sampled_from([0.1, 1.0, 6.0])),
        weight_scale=draw(st.sampled_from([0.5, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.backends("reference", "cpu")
@settings(max_examples=100, **SETTINGS)
@given(case=cell_cases())
def test_fused_lstm_cell_matches_nn_lstm_cell(backend, case):
    config = case["config"]
    ref, fused = scaled_pair(
        nn.LSTMCell, FusedLSTMCell.from_lstm_cell, config, case["weight_scale"], case["seed"]
    )
    lead = () if case["batch"] is None else (case["batch"],)
    x = (torch.randn(*lead, config["input_size"], dtype=F64) * case["input_scale"]).requires_grad_()
    hx = (
        tuple(
            torch.randn(*lead, config["hidden_size"], dtype=F64, requires_grad=True)
            for _ in range(2)
        )
        if case["with_hx"]
        else None
    )
    leaves = [x, *(hx or ())]

    assert_same(
        cell_outputs_and_grads(ref, x, hx, leaves),
        cell_outputs_and_grads(fused, x, hx, leaves),
        **TOL,
    )

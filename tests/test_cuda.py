"""The CUDA kernels against torch.nn.LSTM and the pure-PyTorch reference.

Every test that needs no GPU runs twice: on CPU tensors with the CUDA kernels executed by the
CUDA emulator (fused_lstm.testing.emulated_cuda(), against nn.LSTM on the CPU; always, CI
included), and on a GPU (against cuDNN; skipped without one). The GPU-only tests (streams,
autocast through cuDNN) are skipped without a GPU, never removed. CI also checks that the
compiled CUDA kernels were registered (test_cuda_kernels_registered, FUSED_LSTM_EXPECT_CUDA=1).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMCell, reference
from fused_lstm.testing import emulated_cuda

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

T, B, I, H, P = 5, 3, 4, 6, 3
LENGTHS = [5, 3, 2]


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=needs_cuda)])
def dev(request):
    """The device the CUDA kernels run on: "cuda", or "cpu" under the emulator (which must then
    have run kernels: a test that silently ran the CPU kernels would prove nothing)."""
    if request.param == "cuda":
        yield "cuda"
        return
    with emulated_cuda() as run:
        yield "cpu"
    if request.node.callspec.params.get("batch") != 0:  # with no rows nothing is launched
        assert run.launches > 0 and run.threads > 0, "the emulated CUDA kernels did not run"


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN may run float32 RNNs in TF32 (allow_tf32 defaults to True), which would put ~1e-3
    errors into the float32 baseline."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.skipif(os.environ.get("FUSED_LSTM_EXPECT_CUDA") != "1",
                    reason="set FUSED_LSTM_EXPECT_CUDA=1 where the build must include CUDA kernels")
def test_cuda_kernels_registered():
    for op in ("fused_lstm::layer_forward", "fused_lstm::layer_backward",
               "fused_lstm::cell_forward", "fused_lstm::cell_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


# ---- helpers ------------------------------------------------------------------------------------


def _make_lstm(dev, num_layers=1, bias=True, batch_first=False, bidirectional=False,
               proj_size=0, dtype=torch.float32, seed=0, hidden=H):
    torch.manual_seed(seed)
    return nn.LSTM(I, hidden, num_layers, bias=bias, batch_first=batch_first,
                   bidirectional=bidirectional, proj_size=proj_size).to(dev, dtype)


def _make_inputs(lstm: nn.LSTM, dtype, seed=1, with_hx=True, steps=T, batch=B):
    g = torch.Generator().manual_seed(seed)
    D = 2 if lstm.bidirectional else 1
    Hr = lstm.proj_size or lstm.hidden_size
    dev = lstm.weight_hh_l0.device
    shape = (batch, steps, I) if lstm.batch_first else (steps, batch, I)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    hx = None
    if with_hx:
        hx = (torch.randn(lstm.num_layers * D, batch, Hr, generator=g, dtype=torch.float64),
              torch.randn(lstm.num_layers * D, batch, lstm.hidden_size, generator=g,
                          dtype=torch.float64))
        hx = tuple(t.to(dev, dtype).requires_grad_() for t in hx)
    return x.to(dev, dtype).requires_grad_(), hx


def _run(module, x, hx, packed=None, seed=2):
    """Output, h_n, c_n and the gradients of a fixed random loss w.r.t. x, h0, c0 and every
    parameter. packed: None, "sorted", "unsorted" (x is then padded, lengths LENGTHS) or a list
    of lengths (sorted)."""
    inp = x
    if packed is not None:
        lengths = packed if isinstance(packed, list) else {
            "sorted": LENGTHS, "unsorted": [LENGTHS[1], LENGTHS[0], LENGTHS[2]]}[packed]
        inp = pack_padded_sequence(x, torch.tensor(lengths), batch_first=module.batch_first,
                                   enforce_sorted=packed != "unsorted")
    out, (h, c) = module(inp, hx)
    data = out.data if packed is not None else out
    g = torch.Generator().manual_seed(seed)
    loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device))
               .sum() for t in (data, h, c))
    wrt = [x] + ([] if hx is None else list(hx)) + list(module.parameters())
    grads = torch.autograd.grad(loss, wrt)
    return [data.detach(), h.detach(), c.detach(), *grads]


def _names(module, with_hx):
    return (["output", "h_n", "c_n", "grad_input"] + (["grad_h0", "grad_c0"] if with_hx else [])
            + [f"grad_{n}" for n, _ in module.named_parameters()])


def _compare(got, want, names, atol, rtol):
    for a, b, name in zip(got, want, names, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


GRID = list(itertools.product([1, 2], [True, False], [False, True], [False, True], [0, P],
                              [True, False]))


def _grid_id(p):
    layers, bias, bf, bidir, proj, with_hx = p
    return f"L{layers}-bias{int(bias)}-bf{int(bf)}-bi{int(bidir)}-proj{proj}-hx{int(with_hx)}"


# ---- parity with nn.LSTM --------------------------------------------------------------------


@pytest.mark.parametrize("params", GRID, ids=_grid_id)
def test_float32_matches_nn_lstm(dev, params):
    """Against cuDNN on a GPU, ATen's CPU LSTM under the emulator."""
    layers, bias, bf, bidir, proj, with_hx = params
    lstm = _make_lstm(dev, layers, bias, bf, bidir, proj)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = _make_inputs(lstm, torch.float32, with_hx=with_hx)
    want = _run(lstm, x, hx)
    got = _run(fused, x, hx)
    _compare(got, want, _names(lstm, with_hx), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("params", GRID, ids=_grid_id)
def test_float64_matches_native_lstm(dev, params):
    layers, bias, bf, bidir, proj, with_hx = params
    lstm = _make_lstm(dev, layers, bias, bf, bidir, proj, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = _make_inputs(lstm, torch.float64, with_hx=with_hx)
    with torch.backends.cudnn.flags(enabled=False):
        want = _run(lstm, x, hx)
    got = _run(fused, x, hx)
    _compare(got, want, _names(lstm, with_hx), atol=1e-9, rtol=1e-7)


PACKED = list(itertools.product(["sorted", "unsorted"], [1, 2], [False, True], [0, P],
                                [False, True]))


@pytest.mark.parametrize("packed,layers,bidir,proj,bf", PACKED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_sequence(dev, packed, layers, bidir, proj, bf, dtype):
    lstm = _make_lstm(dev, layers, True, bf, bidir, proj, dtype=dtype)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = _make_inputs(lstm, dtype)
    with torch.backends.cudnn.flags(enabled=dtype == torch.float32):
        want = _run(lstm, x, hx, packed)
    got = _run(fused, x, hx, packed)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-7)
    _compare(got, want, _names(lstm, True), **tol)


@pytest.mark.parametrize("proj", [0, P])
@pytest.mark.parametrize("with_hx", [True, False])
def test_unbatched_input(dev, proj, with_hx):
    lstm = _make_lstm(dev, 2, True, False, True, proj, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = _make_inputs(lstm, torch.float64, with_hx=with_hx, batch=1)
    x = x.detach().squeeze(1).requires_grad_()
    if hx is not None:
        hx = tuple(t.detach().squeeze(1).requires_grad_() for t in hx)
    want = _run(lstm, x, hx)
    got = _run(fused, x, hx)
    _compare(got, want, _names(lstm, with_hx), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bidir,proj,packed", [(False, 0, None), (True, P, None),
                                               (True, 0, "unsorted"), (False, P, "sorted")])
def test_low_precision_error_within_nn_lstm_error(dev, dtype, bidir, proj, packed):
    """Errors against a float64 reference within 3x nn.LSTM's own error at this precision
    (cuDNN for float16 on a GPU, ATen's native path otherwise), plus one ulp of absolute
    slack."""
    lstm64 = _make_lstm(dev, 2, True, False, bidir, proj, dtype=torch.float64)
    x64, hx64 = _make_inputs(lstm64, torch.float64)
    with torch.backends.cudnn.flags(enabled=False):
        ref = _run(lstm64, x64, hx64, packed)
    lstm_lp = _make_lstm(dev, 2, True, False, bidir, proj, dtype=torch.float64).to(dtype)
    lstm_lp.load_state_dict(lstm64.state_dict())
    fused_lp = FusedLSTM.from_lstm(lstm_lp)
    x, hx = _make_inputs(lstm_lp, dtype)
    theirs = _run(lstm_lp, x, hx, packed)
    ours = _run(fused_lp, x, hx, packed)
    floor = torch.finfo(dtype).eps
    for name, r, t, o in zip(_names(lstm64, True), ref, theirs, ours, strict=True):
        err_t = (t.double() - r).abs().max().item()
        err_o = (o.double() - r).abs().max().item()
        assert err_o <= 3 * err_t + floor, f"{name}: ours {err_o:.3g}, nn.LSTM {err_t:.3g}"


# ---- sizes that cross every tile of the kernels ----------------------------------------------
#
# lstm_cuda_thread.h: a block holds kWarps = 8 hidden units (forward) or dh components
# (backward); reductions go through shared memory kChunk = 256 elements at a time (forward over
# Hr, backward over 4H); batch rows go in tiles of BT = 1, 2, 4 or 8 (with_batch_tile picks the
# smallest that holds B, else 8).

TILES = [
    # hidden, proj, batch, packed lengths (None: padded)
    pytest.param(13, 0, 1, None, id="H13-2blocks-B1-BT1"),
    pytest.param(13, 0, 2, None, id="H13-B2-BT2"),
    pytest.param(13, 0, 3, None, id="H13-B3-BT4"),
    pytest.param(13, 5, 6, None, id="H13-proj-B6-BT8"),
    pytest.param(9, 0, 19, [4, 4, 4, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1],
                 id="H9-B19-3batchtiles-packed"),
    pytest.param(70, 0, 11, None, id="H70-bwd4H-2tiles-B11-remainder"),
    pytest.param(70, 20, 3, [3, 2, 1], id="H70-proj-bwd4H-2tiles-packed"),
    pytest.param(260, 0, 3, [2, 2, 1], id="H260-fwdHr-2tiles-bwd4H-5tiles"),
]


def _tile_inputs(dev, hidden, proj, batch, lengths):
    lstm = _make_lstm(dev, 1, True, False, True, proj, dtype=torch.float64, hidden=hidden)
    x, hx = _make_inputs(lstm, torch.float64, steps=max(lengths) if lengths else 2, batch=batch)
    return lstm, x, hx


@pytest.mark.parametrize("hidden,proj,batch,lengths", TILES)
def test_tile_crossing_sizes_match_nn_lstm_in_two_orders(hidden, proj, batch, lengths):
    """Emulated, against nn.LSTM on the CPU; then the same case with the blocks and the threads
    between barriers run in another order must give bitwise the same result (a race on shared
    or global memory would change it)."""
    lstm, x, hx = _tile_inputs("cpu", hidden, proj, batch, lengths)
    fused = FusedLSTM.from_lstm(lstm)
    want = _run(lstm, x, hx, lengths)
    runs = []
    for order in ("forward", "shuffle"):
        with emulated_cuda(order=order, seed=3) as run:
            runs.append(_run(fused, x, hx, lengths))
        assert run.launches > 0
    names = _names(lstm, True)
    _compare(runs[0], want, names, atol=1e-9, rtol=1e-7)
    for name, a, b in zip(names, *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between thread orders"


@needs_cuda
@pytest.mark.parametrize("hidden,proj,batch,lengths", TILES)
def test_tile_crossing_sizes_on_gpu(hidden, proj, batch, lengths):
    lstm, x, hx = _tile_inputs("cuda", hidden, proj, batch, lengths)
    with torch.backends.cudnn.flags(enabled=False):
        want = _run(lstm, x, hx, lengths)
    got = _run(FusedLSTM.from_lstm(lstm), x, hx, lengths)
    _compare(got, want, _names(lstm, True), atol=1e-9, rtol=1e-7)


# ---- gradcheck, streams, autocast, the op itself -------------------------------------------


@pytest.mark.parametrize("bidir,proj,packed", [(False, 0, False), (True, 2, False),
                                               (True, 0, True), (False, 2, True)])
def test_gradcheck_float64(dev, bidir, proj, packed):
    torch.manual_seed(0)
    fused = FusedLSTM(3, 4, bidirectional=bidir, proj_size=proj, device=dev,
                      dtype=torch.float64)
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


@needs_cuda
def test_non_default_stream_matches_default():
    lstm = _make_lstm("cuda", 2, True, False, True, P)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = _make_inputs(lstm, torch.float32)
    want = _run(fused, x, hx)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = _run(fused, x, hx)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_matches_nn_lstm(dtype):
    lstm = _make_lstm("cuda", 2, True, False, True, 0)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = _make_inputs(lstm, torch.float32)
    with torch.autocast("cuda", dtype=dtype):
        out_t, (h_t, c_t) = lstm(x, hx)
        out_f, (h_f, c_f) = fused(x, hx)
    for name, a, b in [("output", out_f, out_t), ("h_n", h_f, h_t), ("c_n", c_f, c_t)]:
        assert a.dtype == b.dtype, f"{name}: {a.dtype} vs nn.LSTM's {b.dtype}"
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)
    (out_f.float().sum() + h_f.float().sum()).backward()
    for p in fused.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_cell_matches_nn_lstm_cell(dtype):
    torch.manual_seed(0)
    cell = nn.LSTMCell(I, H).cuda()
    fused = FusedLSTMCell.from_lstm_cell(cell)
    x = torch.randn(B, I, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        h_t, c_t = cell(x)
        h_f, c_f = fused(x)
    for a, b in [(h_f, h_t), (c_f, c_t)]:
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), atol=2e-2, rtol=2e-2)


def test_native_cuda_op_runs_and_matches_reference(dev):
    if dev == "cuda":
        assert "cuda" in fused_lstm.native_backends()
    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(T, B, I, device=dev, dtype=dt)
    h0, c0 = torch.randn(B, P, device=dev, dtype=dt), torch.randn(B, H, device=dev, dtype=dt)
    w_ih, w_hh = torch.randn(4 * H, I, device=dev, dtype=dt), torch.randn(4 * H, P, device=dev,
                                                                          dtype=dt)
    b_ih, b_hh = torch.randn(4 * H, device=dev, dtype=dt), torch.randn(4 * H, device=dev, dtype=dt)
    w_hr = torch.randn(P, H, device=dev, dtype=dt)
    for reverse, proj in itertools.product([False, True], [False, True]):
        whh = w_hh if proj else torch.randn(4 * H, H, device=dev, dtype=dt)
        h = h0 if proj else torch.randn(B, H, device=dev, dtype=dt)
        args = (x, None, h, c0, w_ih, whh, b_ih, b_hh, w_hr if proj else None, reverse)
        got = torch.ops.fused_lstm.layer_forward(*args)
        want = reference.layer_forward(*args)
        for a, b in zip(got, want, strict=True):
            assert a.device.type == dev and a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
        y, _, _, gates, cells = want
        # Unused outputs arrive as None: only h_n, then only c_n, then everything.
        for gy, gh, gc in [(None, torch.randn_like(h), None), (None, None, torch.randn_like(c0)),
                           (torch.randn_like(y), torch.randn_like(h), torch.randn_like(c0))]:
            bargs = (gy, gh, gc, x, None, h, c0, w_ih, whh, w_hr if proj else None, y, gates,
                     cells, reverse)
            got_b = torch.ops.fused_lstm.layer_backward(*bargs)
            want_b = reference.layer_backward(*bargs)
            for a, b in zip(got_b, want_b, strict=True):
                assert a.dtype == b.dtype and a.shape == b.shape
                torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("batch", [0])
def test_batch_size_zero(dev, batch):
    """No rows: nothing to launch (an empty grid is a launch error), empty results."""
    lstm = _make_lstm(dev, 2, True, False, True, P, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = _make_inputs(lstm, torch.float64, batch=batch)
    _compare(_run(fused, x, hx), _run(lstm, x, hx), _names(lstm, True), atol=0, rtol=0)


# ---- the cell ------------------------------------------------------------------------------


CELL_GRID = list(itertools.product([True, False], [True, False], [True, False]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias,batched,with_hx", CELL_GRID)
def test_cell_matches_nn_lstm_cell(dev, dtype, bias, batched, with_hx):
    torch.manual_seed(0)
    cell = nn.LSTMCell(I, H, bias=bias).to(dev, dtype)
    fused = FusedLSTMCell.from_lstm_cell(cell)
    lead = (B,) if batched else ()
    like = dict(device=dev, dtype=dtype, requires_grad=True)
    x = torch.randn(*lead, I, **like)
    hx = (torch.randn(*lead, H, **like), torch.randn(*lead, H, **like)) if with_hx else None
    wrt = [x, *(hx or ())]
    names = ["h", "c", "grad_input", *(["grad_h0", "grad_c0"] if with_hx else []),
             *(f"grad_{n}" for n, _ in cell.named_parameters())]

    def run(module):
        h, c = module(x, hx)
        g = torch.Generator().manual_seed(2)
        loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)
                    .to(dev)).sum() for t in (h, c))
        return [h.detach(), c.detach(),
                *torch.autograd.grad(loss, [*wrt, *module.parameters()])]

    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-9, rtol=1e-7)
    _compare(run(fused), run(cell), names, **tol)


@pytest.mark.parametrize("bias,batched", [(True, True), (False, False)])
def test_cell_gradcheck_float64(dev, bias, batched):
    torch.manual_seed(0)
    fused = FusedLSTMCell(3, 4, bias=bias, device=dev, dtype=torch.float64)
    names = [n for n, _ in fused.named_parameters()]
    lead = (2,) if batched else ()
    like = dict(device=dev, dtype=torch.float64, requires_grad=True)
    x, h0, c0 = torch.randn(*lead, 3, **like), torch.randn(*lead, 4, **like), torch.randn(
        *lead, 4, **like)
    params = [p.detach().clone().requires_grad_() for p in fused.parameters()]

    def f(x, h0, c0, *params):
        return functional_call(fused, dict(zip(names, params)), (x, (h0, c0)))

    assert torch.autograd.gradcheck(f, (x, h0, c0, *params))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [B, 0])
def test_native_cuda_cell_ops_match_reference(dev, dtype, bias, batch):
    """The cell ops against the reference on the CPU in float64, from the same (rounded)
    inputs; every incoming-gradient case of the backward."""
    torch.manual_seed(0)
    cpu = [torch.randn(batch, I), torch.randn(batch, H), torch.randn(batch, H),
           torch.randn(4 * H, I), torch.randn(4 * H, H),
           *((torch.randn(4 * H), torch.randn(4 * H)) if bias else (None, None))]
    args = [None if t is None else t.to(dev, dtype) for t in cpu]
    wide = [None if t is None else t.cpu().double() for t in args]
    tol = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=1e-5, rtol=1e-5)}
    tol = tol.get(dtype, dict(atol=2e-2, rtol=2e-2))

    def check(got, want):
        for a, b in zip(got, want, strict=True):
            assert a.device.type == dev and a.dtype == dtype and a.shape == b.shape
            torch.testing.assert_close(a.cpu().double(), b, **tol)

    out = torch.ops.fused_lstm.cell_forward(*args)
    check(out, reference.cell_forward(*wide))
    h, c, gates, cells = out
    for gh, gc in [(torch.randn_like(h), torch.randn_like(c)), (torch.randn_like(h), None),
                   (None, torch.randn_like(c)), (None, None)]:
        bargs = (gh, gc, *args[:5], gates, cells)
        check(torch.ops.fused_lstm.cell_backward(*bargs),
              reference.cell_backward(*(None if t is None else t.cpu().double() for t in bargs)))

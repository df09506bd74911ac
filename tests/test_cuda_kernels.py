"""What only the CUDA kernels have, and their ops against the reference: the compiled kernels'
registration (FUSED_LSTM_EXPECT_CUDA=1 in CI), sizes that cross every tile of the kernels (run by
the CUDA emulator in two thread orders, and on a GPU), streams and autocast on a GPU.

The CUDA kernels' parity with nn.LSTM is in test_parity.py, their gradcheck in test_gradcheck.py:
those run on the emulated_cuda and cuda backends (conftest.py). The GPU-only tests are skipped
without a GPU, never removed.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from torch import nn

from fused_lstm import FusedLSTM, FusedLSTMCell, reference
from fused_lstm.testing import emulated_cuda
from helpers import (compare, grad_names, make_inputs, make_lstm, needs_cuda, needs_emulator,
                     run_lstm)

T, B, I, H, P = 5, 3, 4, 6, 3


@pytest.mark.skipif(os.environ.get("FUSED_LSTM_EXPECT_CUDA") != "1",
                    reason="set FUSED_LSTM_EXPECT_CUDA=1 where the build must include CUDA kernels")
def test_cuda_kernels_registered():
    for op in ("fused_lstm::layer_forward", "fused_lstm::layer_backward",
               "fused_lstm::cell_forward", "fused_lstm::cell_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


# ---- the ops against the reference ----------------------------------------------------------


@pytest.mark.backends("emulated_cuda", "cuda")
def test_native_cuda_op_runs_and_matches_reference(backend):
    dev = backend.device
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


@pytest.mark.backends("emulated_cuda", "cuda")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [B, pytest.param(0, marks=pytest.mark.no_launch)])  # no rows
def test_native_cuda_cell_ops_match_reference(backend, dtype, bias, batch):
    """The cell ops against the reference on the CPU in float64, from the same (rounded)
    inputs; every incoming-gradient case of the backward."""
    dev = backend.device
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


def tile_inputs(dev, hidden, proj, batch, lengths):
    lstm = make_lstm(dev, 1, True, False, True, proj, dtype=torch.float64, hidden=hidden)
    x, hx = make_inputs(lstm, torch.float64, steps=max(lengths) if lengths else 2, batch=batch)
    return lstm, x, hx


@needs_emulator
@pytest.mark.parametrize("hidden,proj,batch,lengths", TILES)
def test_tile_crossing_sizes_match_nn_lstm_in_two_orders(hidden, proj, batch, lengths):
    """Emulated, against nn.LSTM on the CPU; then the same case with the blocks and the threads
    between barriers run in another order must give bitwise the same result (a race on shared
    or global memory would change it)."""
    lstm, x, hx = tile_inputs("cpu", hidden, proj, batch, lengths)
    fused = FusedLSTM.from_lstm(lstm)
    want = run_lstm(lstm, x, hx, lengths)
    runs = []
    for order in ("forward", "shuffle"):
        with emulated_cuda(order=order, seed=3) as run:
            runs.append(run_lstm(fused, x, hx, lengths))
        assert run.launches > 0
    names = grad_names(lstm, True)
    compare(runs[0], want, names, atol=1e-9, rtol=1e-7)
    for name, a, b in zip(names, *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between thread orders"


@needs_cuda
@pytest.mark.parametrize("hidden,proj,batch,lengths", TILES)
def test_tile_crossing_sizes_on_gpu(hidden, proj, batch, lengths):
    lstm, x, hx = tile_inputs("cuda", hidden, proj, batch, lengths)
    with torch.backends.cudnn.flags(enabled=False):
        want = run_lstm(lstm, x, hx, lengths)
    got = run_lstm(FusedLSTM.from_lstm(lstm), x, hx, lengths)
    compare(got, want, grad_names(lstm, True), atol=1e-9, rtol=1e-7)


# ---- streams and autocast, on a GPU ------------------------------------------------------


@needs_cuda
def test_non_default_stream_matches_default():
    lstm = make_lstm("cuda", 2, True, False, True, P)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = make_inputs(lstm, torch.float32)
    want = run_lstm(fused, x, hx)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = run_lstm(fused, x, hx)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_matches_nn_lstm(dtype):
    lstm = make_lstm("cuda", 2, True, False, True, 0)
    fused = FusedLSTM.from_lstm(lstm)
    x, hx = make_inputs(lstm, torch.float32)
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

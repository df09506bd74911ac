"""The CUDA kernels' per-thread functions, run on the host for every (block, warp, lane) of the
per-step launches (tests/cuda_host_emulation.cpp) and compared with the reference in float64.
Compiles a small C++ extension on the fly (about a minute). This is how the CUDA kernels' index
math and reductions are checked on machines without a GPU, CI's included."""

import pathlib

import pytest
import torch

from fused_lstm import reference as R

@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load
    src = pathlib.Path(__file__).with_name("cuda_host_emulation.cpp")
    return load("fused_lstm_cuda_host_emulation", [str(src)], extra_cflags=["-O1"])


# H = 300 makes the forward (Hr) and backward (4H) reductions span several shared-memory tiles.
@pytest.mark.parametrize("H,B,sizes", [(6, 3, [3, 3, 2, 1]), (37, 5, [5, 4, 4, 2, 1]),
                                       (300, 3, [3, 2, 2]), (9, 1, [1, 1, 1, 1])])
@pytest.mark.parametrize("reverse", [False, True])
def test_host_emulation_matches_reference(emu, H, B, sizes, reverse):
    torch.manual_seed(0)
    dt, I = torch.float64, 4
    bsz = torch.tensor(sizes)
    N = int(bsz.sum())
    x = torch.randn(N, I, dtype=dt)
    h0, c0 = torch.randn(B, H, dtype=dt), torch.randn(B, H, dtype=dt)
    w_ih, w_hh = torch.randn(4 * H, I, dtype=dt) * 0.3, torch.randn(4 * H, H, dtype=dt) * 0.3
    want = R.layer_forward(x, bsz, h0, c0, w_ih, w_hh, None, None, None, reverse)
    got = emu.fwd(x @ w_ih.t(), w_hh, h0, c0, bsz, reverse)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    y, _, _, gates, cells = want
    dy, gh, gc = torch.randn_like(y), torch.randn_like(h0), torch.randn_like(c0)
    wb = R.layer_backward(dy, gh, gc, x, bsz, h0, c0, w_ih, w_hh, None, y, gates, cells, reverse)
    dz, gh0, dc, src = emu.bwd(dy, gh, gc, w_hh, c0, gates, cells, bsz, reverse)
    h_prev = torch.cat([y, h0])[torch.where(src >= 0, src, N + (-1 - src))]
    close = dict(atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(gh0, wb[1], **close)
    torch.testing.assert_close(dc, wb[2], **close)
    torch.testing.assert_close(dz @ w_ih, wb[0], **close)
    torch.testing.assert_close(dz.t() @ h_prev, wb[4], **close)
    torch.testing.assert_close(dz.sum(0), wb[5], **close)

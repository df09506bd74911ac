"""The CPU kernel's per-step product paths against nn.LSTM in float64, at sizes that cross each of
its register tiles, panels and thresholds, on 1, 2 and 3 threads, and bitwise reproducible
from call to call for a given thread count.

The paths (csrc/cpu/step_product.h, StepProduct): a batch of one row reads W^T whole
(VecMatRows); a batch of more rows reads W^T in packed panels of panel_bytes of columns
(32 float / 16 double at 128), in row tiles of 8 (AVX-512), 6 (AVX2) or 4 (SSE), then 4, 2 and
1; from gemm_rows rows on a step goes to BLAS; from parallel_work multiply-adds a step is split
across threads. The thresholds are csrc/tuning.h's, read through fused_lstm._C.TUNING."""

import contextlib

import pytest
import torch
from torch import nn

import fused_lstm
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTM, native_backends, reference
from helpers import assert_same, outputs_and_grads

# The kernels' thresholds (csrc/tuning.h), read from the extension so that the sizes below cross
# the real boundaries. Empty without the CPU kernels, whose tests are skipped then.
TUNING = fused_lstm._C.TUNING if "cpu" in native_backends() else {}


def rows_to_reach(work, per_row):
    """The fewest rows whose work, per_row multiply-adds a row, reaches the threshold work."""
    return -(-work // per_row)


pytestmark = pytest.mark.skipif("cpu" not in native_backends(), reason="needs the CPU kernels")

ATOL = 1e-9


@contextlib.contextmanager
def num_threads(n):
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def pack_cache(on):
    """The cache of packed weights (csrc/cpu/pack_cache.h) on at its capacity, or off: a one-step
    call reads W in place where it is off (or the weight too small for it), a pack where it is
    on."""
    saved = fused_lstm._C.pack_cache_stats()["capacity"]
    fused_lstm._C.pack_cache_set_capacity(saved if on else 0)
    try:
        yield
    finally:
        fused_lstm._C.pack_cache_set_capacity(saved)


def check_parity(B, H, proj=0, I=5, T=3, threads=1, bidirectional=False, calls=1):
    """calls > 2 also runs from packs kept by the cache (stored at the second call)."""
    ref = nn.LSTM(I, H, proj_size=proj, bidirectional=bidirectional, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 if bidirectional else 1, B, proj or H, dtype=torch.float64)
    c0 = torch.randn(2 if bidirectional else 1, B, H, dtype=torch.float64)
    with num_threads(threads):
        want = outputs_and_grads(ref, x, (h0, c0), [x])
        for _ in range(calls):
            assert_same(want, outputs_and_grads(fused, x, (h0, c0), [x]), atol=ATOL)


# Every remainder of the row tiles (8, 6, 4, 2, 1) and 4H below, at and across one and two
# panels of 16 doubles (H = 3, 4, 5, 8, 9), with and without a projection.
@pytest.mark.parametrize("B", [2, 3, 5, 6, 7, 8, 9, 11, 13, 15, 17])
@pytest.mark.parametrize("H, proj", [(3, 0), (4, 0), (5, 2), (8, 0), (9, 7)])
def test_panel_tiles(B, H, proj):
    check_parity(B, H, proj, bidirectional=True)


# Steps of parallel_work multiply-adds or more split across threads, unevenly with 3 (and with 2
# when the panels are odd in number: 4H = 4 * 100 is 25 panels): the fewest rows that reach it,
# and more.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("extra_rows, H, proj", [(0, 100, 0), (0, 130, 60), (6, 96, 0)])
def test_panels_split_across_threads(threads, extra_rows, H, proj):
    B = rows_to_reach(TUNING["parallel_work"], (proj or H) * 4 * H) + extra_rows
    check_parity(B, H, proj, threads=threads)


# Where the gate blocks pad to at most one panel in eight, the forward packs each gate's columns
# on its own and runs a thread's units' gate math right after their product (StepProduct::fused):
# at H = 48, three panels of 16 doubles a gate, split 2 + 1 on two threads and 1 + 1 + 1 on
# three. The packed batch shrinks from 64 rows (a step split across threads) to 3 (on one); the
# zoneout masks and the recurrent mask go through the same pass.
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("regularised", [False, True])
def test_gate_blocks_fused_with_the_gate_math(threads, regularised):
    ref = nn.LSTM(5, 48, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(ref)
    seqs = [
        torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
        for n in [4] * 3 + [3] * 20 + [2] * 38 + [1] * 3
    ]
    if not regularised:
        with num_threads(threads):
            assert_same(
                outputs_and_grads(ref, pack_sequence(seqs), None, seqs),
                outputs_and_grads(fused, pack_sequence(seqs), None, seqs),
                atol=ATOL,
            )
        return
    packed = pack_sequence(seqs)
    rows, B, H = packed.data.shape[0], 64, 48
    f64 = {"dtype": torch.float64}
    args = [
        packed.data.detach(),
        packed.batch_sizes,
        torch.randn(B, H, **f64),
        torch.randn(B, H, **f64),
        ref.weight_ih_l0.detach(),
        ref.weight_hh_l0.detach(),
        ref.bias_ih_l0.detach(),
        ref.bias_hh_l0.detach(),
        None,
        False,
        torch.bernoulli(torch.full((B, H), 0.7, **f64)) / 0.7,
        torch.bernoulli(torch.full((rows, H), 0.4, **f64)),
        torch.bernoulli(torch.full((rows, H), 0.3, **f64)),
        None,
    ]
    want = reference.layer_forward(*args)
    with num_threads(threads):
        got = torch.ops.fused_lstm.layer_forward(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# Where the packed W fits twice in a core's L2 and each thread gets at least 4 rows, a step
# splits its rows across threads instead, the forward's gate math and the backward's with each
# thread's product (StepProduct::splits_rows): at H = 96 (295 KB of packed doubles, so on any L2
# of 1 MB or more) and 16 rows, split 8 + 8 on two threads and 6 + 6 + 4 on three. The packed
# batch shrinks from 16 rows to 2, through the smallest split (8 rows on two threads) and out of
# the parallel steps; the reverse direction grows back through them. Regularised, the op's
# forward and backward against the reference's, every mask and a reset included.
def row_split_sequences():
    return [
        torch.randn(n, 5, dtype=torch.float64, requires_grad=True)
        for n in [6] * 2 + [5] * 4 + [4] * 2 + [3] * 3 + [2] * 3 + [1] * 2
    ]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_rows_split_across_threads(threads):
    ref = nn.LSTM(5, 96, bidirectional=True, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(ref)
    seqs = row_split_sequences()
    with num_threads(threads):
        assert_same(
            outputs_and_grads(ref, pack_sequence(seqs), None, seqs),
            outputs_and_grads(fused, pack_sequence(seqs), None, seqs),
            atol=ATOL,
        )


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("reverse", [False, True])
def test_rows_split_regularised(threads, reverse):
    packed = pack_sequence(row_split_sequences())
    rows, B, H = packed.data.shape[0], 16, 96
    f64 = {"dtype": torch.float64}
    weights = [
        torch.randn(4 * H, 5, **f64) * 0.3,
        torch.randn(4 * H, H, **f64) * 0.1,
        torch.randn(4 * H, **f64),
        torch.randn(4 * H, **f64),
    ]
    args = [
        packed.data.detach(),
        packed.batch_sizes,
        torch.randn(B, H, **f64),
        torch.randn(B, H, **f64),
        *weights,
        None,
        reverse,
        torch.bernoulli(torch.full((B, H), 0.7, **f64)) / 0.7,
        torch.bernoulli(torch.full((rows, H), 0.4, **f64)),
        torch.bernoulli(torch.full((rows, H), 0.3, **f64)),
        torch.rand(rows) < 0.2,
    ]
    want = reference.layer_forward(*args)
    with num_threads(threads):
        got = torch.ops.fused_lstm.layer_forward(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    grads = [torch.randn(rows, H, **f64), torch.randn(B, H, **f64), torch.randn(B, H, **f64)]
    backward_args = [*grads, *args[:6], None, *want[:1], *want[3:], reverse, *args[10:]]
    want_grads = reference.layer_backward(*backward_args)
    with num_threads(threads):
        got_grads = torch.ops.fused_lstm.layer_backward(*backward_args)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# gemm_rows rows and more go to BLAS, one fewer stay on the panels; both split across threads at
# H = 24.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("extra_rows", [-1, 0, 5])
def test_blas_rows_threshold(threads, extra_rows):
    B = TUNING["gemm_rows"] + extra_rows
    assert B * 24 * 96 >= TUNING["parallel_work"]
    check_parity(B, 24, I=3, T=2, threads=threads)


# A one-step call reads W_hh (and W_hr) in place where the pack cache does not take the weight:
# dot products eight outputs at a time in the forward (4H = 12, 20, 36: a remainder of 4 or
# none), axpys over W_hh's rows in the backward; from 2**19 multiply-adds split across threads
# (B = 1, H = 400), from 2**20 a thread's share goes to BLAS (B = 40, H = 200). Where the cache
# takes it (on, and the pack at least pack_cache_min_bytes), the call reads the pack instead,
# the first calls building it and the third reading the stored one.
@pytest.mark.parametrize("cache", [False, True], ids=["in-place", "cached"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "B, H, proj",
    [(1, 3, 0), (1, 5, 2), (3, 9, 0), (7, 20, 4), (1, 400, 0), (40, 200, 0), (300, 24, 0)],
)
def test_one_step_reads_the_weights_in_place(cache, threads, B, H, proj):
    with pack_cache(cache):
        check_parity(B, H, proj, T=1, threads=threads, bidirectional=True, calls=3 if cache else 1)


# A one-step call's product (a FusedLSTMCell step) of direct_gemm_work multiply-adds or more
# goes to ATen's GEMM, one row fewer stays on DirectRows: both against nn.LSTM, forward (W_hh
# read in place) and backward (W_hh^T), on one and two threads; and from the cached pack.
@pytest.mark.parametrize("cache", [False, True], ids=["in-place", "cached"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("extra_rows", [-1, 0, 3])
def test_one_step_gemm_threshold(cache, threads, extra_rows):
    H = 16
    B = rows_to_reach(TUNING["direct_gemm_work"], H * 4 * H) + extra_rows
    with pack_cache(cache):
        check_parity(B, H, T=1, threads=threads, bidirectional=True, calls=3 if cache else 1)


# A float32 product over the sequence of onednn_work multiply-adds or more goes to oneDNN's matmul
# (mkldnn::_linear_pointwise) where torch has it, one step fewer to ATen's GEMM: against the
# float64 nn.LSTM within float32's error, bitwise reproducible, with and without biases, and
# the op called exactly where the products reach the threshold.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("extra_steps", [-1, 0, 42])
def test_large_float32_input_projection(threads, bias, extra_steps):
    ref = nn.LSTM(64, 64, bias=bias, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(ref).float()
    # Rows x 64 x 256 multiply-adds, each product over the sequence the same count.
    T = rows_to_reach(TUNING["onednn_work"], 8 * 64 * 256) + extra_steps
    x = torch.randn(T, 8, 64, dtype=torch.float64)
    want = outputs_and_grads(ref, x.requires_grad_(), None, [x])
    x32 = x.detach().float().requires_grad_()
    with num_threads(threads), torch.profiler.profile() as prof:
        got = outputs_and_grads(fused, x32, None, [x32])
        again = outputs_and_grads(fused, x32, None, [x32])
    assert_same([w.float() for w in want], got, atol=2e-5)
    assert_same(got, again, atol=0)
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        called = any(e.name == "mkldnn::_linear_pointwise" for e in prof.events())
        assert called == (extra_steps >= 0)


def test_packed_sequence_down_to_one_row():
    """Batch sizes 7, 5, 2, 1: the panels' row tiles shrink step by step to a single row."""
    ref = nn.LSTM(4, 10, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(ref)
    seqs = [
        torch.randn(n, 4, dtype=torch.float64, requires_grad=True) for n in (4, 3, 3, 2, 2, 1, 1)
    ]
    assert_same(
        outputs_and_grads(ref, pack_sequence(seqs), None, seqs),
        outputs_and_grads(fused, pack_sequence(seqs), None, seqs),
        atol=ATOL,
    )


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, H", [(1, 20), (1, 640), (8, 64), (13, 100), (300, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_reproducible(threads, B, H, dtype):
    """Two identical calls give bit-identical outputs and gradients on every path."""
    fused = FusedLSTM(6, H, dtype=dtype)
    x = torch.randn(4, B, 6, dtype=dtype, requires_grad=True)
    with num_threads(threads):
        first = outputs_and_grads(fused, x, None, [x])
        second = outputs_and_grads(fused, x, None, [x])
        third = outputs_and_grads(fused, x, None, [x])  # from the packs the second call stored
    assert_same(first, second, atol=0)
    assert_same(first, third, atol=0)


# A call's products over the whole sequence run as loops below small_projection (the input
# projection) and small_grads (the gradients) multiply-adds, ATen GEMMs from there: one row
# below and at each threshold, at I = 4, H = 20.
@pytest.mark.parametrize(
    "threshold, extra_rows",
    [
        (None, 0),
        ("small_projection", -1),
        ("small_projection", 0),
        ("small_grads", -1),
        ("small_grads", 0),
    ],
)
def test_small_sequence_products_threshold(threshold, extra_rows):
    per_row = {"small_projection": 4 * 20 * 4, "small_grads": 4 * 20 * (2 * 4 + 20)}
    T = (
        1
        if threshold is None
        else rows_to_reach(TUNING[threshold], per_row[threshold]) + extra_rows
    )
    check_parity(1, 20, I=4, T=T)
    check_parity(1, 20, I=4, T=T, bidirectional=True)

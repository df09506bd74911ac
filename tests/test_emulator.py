"""The CUDA emulator itself (csrc/emulator), on its test kernels
(csrc/emulator/selftest_kernels.cpp): each feature on a correct kernel, and one planted bug of each
kind it must catch, with its message."""

from __future__ import annotations

import os
import pathlib
import subprocess

import pytest
import torch

from fused_lstm.testing import emulated_cuda
from helpers import needs_emulator

pytestmark = needs_emulator
emu = pytest.importorskip(
    "fused_lstm._emulated_cuda",
    reason="needs the CUDA emulator (install with FUSED_LSTM_BUILD_EMULATOR=1)",
)
K = emu.selftest


def test_barrier_orders_shared_memory_in_every_order():
    x = torch.arange(128.0)
    for order in ("forward", "reverse", "shuffle"):
        with emulated_cuda(order=order, seed=5) as run:
            got = K.reverse(x, True)
        assert torch.equal(got, x.view(2, 64).flip(1).reshape(-1)), order
        assert (run.launches, run.threads) == (1, 128)


def test_missing_barrier_is_caught_by_the_order_check():
    x = torch.arange(128.0)
    with emulated_cuda(order="forward"):
        forward = K.reverse(x, False)
    with emulated_cuda(order="reverse"):
        reverse = K.reverse(x, False)
    assert not torch.equal(forward, reverse)


def test_shared_memory_starts_poisoned():
    assert K.read_unwritten(64).isnan().all()


PLANTED = [
    pytest.param(
        "divergent_barrier",
        64,
        r"threads wait at different barriers: thread \(0, 0, 0\) at __syncthreads\(\) "
        r"selftest_kernels.cpp:\d+, thread \(16, 0, 0\) at __syncthreads\(\) "
        r"selftest_kernels.cpp:\d+",
        id="divergent-barrier",
    ),
    pytest.param(
        "exit_at_barrier",
        64,
        r"1 thread\(s\) exited while 63 wait at __syncthreads\(\) selftest_kernels.cpp:\d+",
        id="exit-at-barrier",
    ),
    pytest.param(
        "out_of_mask",
        32,
        r"warp 0 lane 5 calls __shfl_xor_sync selftest_kernels.cpp:\d+ outside its mask 0xf",
        id="out-of-mask",
    ),
    pytest.param(
        "exited_lane",
        32,
        r"the mask 0xffffffff of warp 0 lane 0 .* names lane 16, which has exited",
        id="exited-lane",
    ),
    pytest.param(
        "wrong_source",
        32,
        r"__shfl_sync selftest_kernels.cpp:\d+ reads lane 20, which is not in the mask",
        id="wrong-shuffle-source",
    ),
    pytest.param(
        "big_shared",
        32,
        r"49156 bytes static plus 0 dynamic exceed 48 KiB",
        id="static-shared-over-48KiB",
    ),
]


@pytest.mark.parametrize("kernel,threads,match", PLANTED)
def test_planted_bug_is_caught(kernel, threads, match):
    with pytest.raises(
        RuntimeError,
        match=rf"CUDA emulator: kernel {kernel} \(launched at "
        rf"selftest_kernels.cpp:\d+\): .*{match}",
    ):
        getattr(K, kernel)(threads)


def test_vector_load_reads_16_bytes_and_faults_when_misaligned():
    x = torch.arange(80.0)
    assert torch.equal(K.vector_load(x, 0), x[:64])
    assert torch.equal(K.vector_load(x, 4), x[4:68])
    with pytest.raises(
        RuntimeError,
        match=r"kernel vector_load_kernel \(launched at "
        r"selftest_kernels.cpp:\d+\): block \(0, 0, 0\), thread \(0, 0, 0\): "
        r"misaligned address \(cudaErrorMisalignedAddress\): a 16-byte access at "
        r"selftest_kernels.cpp:\d+",
    ):
        K.vector_load(x, 1)


def _lanes(f):
    """f(lane, warp base) for the 64 threads of two warps."""
    return torch.tensor([float(f(t % 32, t - t % 32)) for t in range(64)])


def test_shuffles_follow_cuda_semantics():
    got = K.shuffles()

    def seg(lane, width):
        return lane // width * width

    def xor(lane, mask, width):
        src = lane ^ mask
        return src if src < seg(lane, width) + width else lane  # later segments: own value

    want = [
        _lanes(lambda l, w: w + 3),
        _lanes(lambda l, w: w + seg(l, 8) + 5),
        _lanes(lambda l, w: w + (l - 2 if l >= 2 else l)),
        _lanes(lambda l, w: w + (l - 3 if l % 8 >= 3 else l)),
        _lanes(lambda l, w: w + (l + 2 if l + 2 < 32 else l)),
        _lanes(lambda l, w: w + (l + 3 if l % 8 + 3 < 8 else l)),
        _lanes(lambda l, w: w + (l ^ 1)),
        _lanes(lambda l, w: w + xor(l, 12, 8)),
        _lanes(lambda l, w: sum(range(w, w + 32))),
        _lanes(lambda l, w: w + (l + 1 if l % 16 + 1 < 16 else l)),
    ]
    for k, w in enumerate(want):
        assert torch.equal(got[k], w), (k, got[k], w)


def test_syncwarp_orders_a_warps_shared_memory():
    assert torch.equal(K.syncwarp(64), _lanes(lambda l, w: 31 - l))


def test_exception_in_a_kernel_reaches_the_caller_and_the_emulator_recovers():
    with pytest.raises(
        RuntimeError,
        match=r"kernel throwing .*thread \(7, 0, 0\) raised: "
        r"planted failure in thread 7",
    ):
        K.throwing(64)
    x = torch.arange(64.0)
    assert torch.equal(K.reverse(x, True), x.flip(0))


def test_thread_and_block_coordinates():
    got = K.coords((2, 3, 1), (4, 2, 2), 0)
    want = [
        [tx, ty, tz, bx, by, bz]
        for bz in range(1)
        for by in range(3)
        for bx in range(2)
        for tz in range(2)
        for ty in range(2)
        for tx in range(4)
    ]
    assert torch.equal(got, torch.tensor(want, dtype=torch.float32))


@pytest.mark.parametrize(
    "grid,block,smem,match",
    [
        ((1, 1, 1), (1025, 1, 1), 0, r"block \(1025, 1, 1\): CUDA allows at most 1024 threads"),
        ((1, 1, 1), (64, 32, 1), 0, r"block \(64, 32, 1\)"),
        ((1, 1, 1), (1, 1, 65), 0, r"block \(1, 1, 65\)"),
        ((1, 1, 1), (1, 1025, 1), 0, r"block \(1, 1025, 1\)"),
        ((1, 65536, 1), (32, 1, 1), 0, r"grid \(1, 65536, 1\) exceeds"),
        ((1, 1, 65536), (32, 1, 1), 0, r"grid \(1, 1, 65536\) exceeds"),
        ((0, 1, 1), (32, 1, 1), 0, r"empty grid \(0, 1, 1\)"),
        (
            (1, 1, 1),
            (32, 1, 1),
            48 * 1024 + 1,
            r"49153 bytes of dynamic shared memory exceed 48 KiB",
        ),
    ],
)
def test_launch_limits(grid, block, smem, match):
    with pytest.raises(
        RuntimeError,
        match=r"kernel coords_kernel \(launched at "
        r"selftest_kernels.cpp:\d+\): invalid launch configuration.*" + match,
    ):
        K.coords(grid, block, smem)


def test_launch_at_the_limits_runs():
    assert K.coords((1, 1, 1), (1024, 1, 1), 48 * 1024).shape == (1024, 6)
    assert K.coords((1, 1, 1), (1, 1, 64), 0).shape == (64, 6)


def test_emulated_cuda_rejects_an_unknown_order():
    with pytest.raises(ValueError, match="order must be one of"):
        with emulated_cuda(order="sideways"):
            pass


@pytest.mark.parametrize("flags", [[], ["-DFL_EMU_UCONTEXT"]], ids=["asm-switch", "ucontext"])
def test_both_context_switches_run_a_kernel(tmp_path, flags):
    """benchmarks/emulator_switch.cpp checks its kernel's results; the ucontext switch (the one
    used off x86-64) is otherwise never run here."""
    root = pathlib.Path(__file__).resolve().parents[1]
    exe = tmp_path / "switch"
    cxx = os.environ.get("CXX", "c++")
    subprocess.run(
        [
            cxx,
            "-O1",
            "-std=c++20",
            *flags,
            f"-I{root / 'csrc'}",
            str(root / "benchmarks" / "emulator_switch.cpp"),
            str(root / "csrc" / "emulator" / "emulator.cpp"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    subprocess.run([str(exe)], check=True)

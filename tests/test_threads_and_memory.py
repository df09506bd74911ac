"""Several Python threads running FusedLSTM at once get what they get one after another, results
do not depend on timing or (for the masks) on the intra-op thread count, the kernels' threaded
paths match nn.LSTM, and a long training run does not grow resident memory."""

import contextlib
import os
import threading

import pytest
import torch
from torch import nn

import fused_lstm
from fused_lstm import FusedLSTM
from helpers import assert_same, needs_extension, outputs_and_grads


@pytest.mark.backends("reference", "cpu")
def test_four_threads_match_sequential_runs(backend):
    """Each thread has its own model copy and input, runs forward and backward a few times,
    and must get exactly (bit for bit) what the same work gives run sequentially. Sizes large
    enough that the CPU kernel runs the recurrent products on its packed panels and splits the
    projection and the gate math across its own threads (test_cpu_kernels)."""
    torch.manual_seed(0)
    jobs = []
    for _ in range(4):
        model = FusedLSTM(16, 96, bidirectional=True, proj_size=40, dtype=torch.float64)
        x = torch.randn(4, 70, 16, dtype=torch.float64, requires_grad=True)
        jobs.append((model, x))
    sequential = [outputs_and_grads(model, x, None, [x]) for model, x in jobs]

    start = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(k):
        try:
            model, x = jobs[k]
            start.wait()
            # reference_only holds for the thread that enters it.
            with backend.context():
                results[k] = [outputs_and_grads(model, x, None, [x]) for _ in range(3)]
        except BaseException as e:  # reported by the main thread, not lost in this one
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for want, runs in zip(sequential, results):
        for got in runs:
            assert_same(want, got, atol=0)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.backends("cpu", "cuda")
def test_training_does_not_grow_memory(backend):
    """2 000 training steps after a warm-up. The smallest tensor a step makes is h_n (4 KiB);
    leaking it, or anything bigger, every step would add 8 MB or more: the bound is 4 MB. On a
    GPU the allocator's count of allocated bytes must come back to where it was.

    One intra-op thread: the check is about allocations, and on a busy machine OpenMP threads
    waiting for a core at each of the 2 000 steps' barriers stretch the run to a minute."""
    device = backend.device
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        check_training_memory(device)
    finally:
        torch.set_num_threads(threads)


def check_training_memory(device):
    torch.manual_seed(0)
    model = FusedLSTM(8, 32, bidirectional=True, device=device)
    head = nn.Linear(64, 1, device=device)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=1e-3)
    x, y = torch.randn(8, 16, 8, device=device), torch.randn(8, 16, 1, device=device)

    def step():
        out, (h, c) = model(x)
        loss = (head(out) - y).square().mean() + h.square().mean() + c.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(200):
        step()
    rss, allocated = resident_bytes(), torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(2000):
        step()
    assert resident_bytes() - rss < 4e6
    if device == "cuda":
        assert torch.cuda.memory_allocated() == allocated


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B, H", [(8, 128), (64, 128)])
def test_identical_calls_give_identical_bits(backend, threads, B, H):
    """Two identical calls, dropout included (same seed), give the same outputs and gradients
    bit for bit for a given thread count: nothing is reduced in an order that depends on timing.
    Steps of B * H * 4H multiply-adds: (8, 128) is split across threads by the CPU kernel's own
    loops (kParallelWork), (64, 128) also hands each thread's share to BLAS (kGemmWork)."""
    model = FusedLSTM(32, H, num_layers=2, bidirectional=True, dropout=0.3)
    x = torch.randn(3, B, 32, requires_grad=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for _ in range(2):
            torch.manual_seed(5)
            runs.append(outputs_and_grads(model, x, None, [x]))
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@needs_extension
def test_kernels_split_work_across_threads():
    """The CPU kernels' threaded steps really run on several threads: at::parallel_for is inline
    code that stays on one thread unless the extension is compiled with OpenMP, which it once
    was not."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert fused_lstm._C.parallel_for_threads() == 2
    finally:
        torch.set_num_threads(saved)


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("B, H, proj", [(70, 96, 40), (1, 640, 0), (48, 320, 0)])
def test_large_steps_threads_and_gemm_paths(backend, threads, B, H, proj):
    """Steps big enough that the CPU kernel splits the per-step products' columns across
    threads (an uneven split with 3), over packed panels (B=70, B=48) or over a batch of one
    (B=1). tests/test_cpu_kernels.py crosses each tile, panel and threshold, BLAS's included."""
    ref = nn.LSTM(16, H, proj_size=proj, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(3, B, 16, dtype=torch.float64, requires_grad=True)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_same(
            outputs_and_grads(ref, x, None, [x]), outputs_and_grads(fused, x, None, [x]), atol=1e-9
        )
    finally:
        torch.set_num_threads(saved)


keep_mask = torch.ops.fused_lstm.keep_mask


def test_keep_mask_is_torch_generator_seeded_and_thread_independent():
    like = torch.empty(0)
    size = [300, 1000]  # several threads' shares
    torch.manual_seed(5)
    a, b = keep_mask(like, size, 0.5, 1.0), keep_mask(like, size, 0.5, 1.0)
    assert not torch.equal(a, b)  # the generator advanced
    with contextlib.ExitStack() as stack:
        saved = torch.get_num_threads()
        stack.callback(torch.set_num_threads, saved)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(5)
            assert torch.equal(keep_mask(like, size, 0.5, 1.0), a)

"""What only the CUDA kernels have, and their ops against the reference: the compiled kernels'
registration (FUSED_LSTM_EXPECT_CUDA=1 in CI), sizes that cross every tile of the kernels (run by
the CUDA emulator in two thread orders, and on a GPU), streams and autocast on a GPU.

The CUDA kernels' parity with nn.LSTM is in test_parity.py, their gradcheck in test_gradcheck.py:
those run on the emulated_cuda and cuda backends (conftest.py). The GPU-only tests are skipped
without a GPU, never removed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from fused_lstm import FusedLSTM, FusedLSTMCell, reference
from fused_lstm.testing import emulated_cuda
from helpers import (
    compare,
    grad_names,
    load_script,
    make_inputs,
    make_lstm,
    needs_cuda,
    needs_emulator,
    needs_extension,
    run_lstm,
)

T, B, I, H, P = 5, 3, 4, 6, 3
F64 = torch.float64


@pytest.mark.skipif(
    os.environ.get("FUSED_LSTM_EXPECT_CUDA") != "1",
    reason="set FUSED_LSTM_EXPECT_CUDA=1 where the build must include CUDA kernels",
)
def test_cuda_kernels_registered():
    for op in (
        "fused_lstm::layer_forward",
        "fused_lstm::layer_backward",
        "fused_lstm::cell_forward",
        "fused_lstm::cell_backward",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def _cuobjdump():
    """triton's bundled cuobjdump (torch's CUDA wheels bring triton), or the toolkit's."""
    try:
        import triton
    except ImportError:
        bundled = None
    else:
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    for path in (bundled, shutil.which("cuobjdump")):
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.mark.skipif(
    os.environ.get("FUSED_LSTM_EXPECT_CUDA") != "1"
    or not os.environ.get("TORCH_CUDA_ARCH_LIST", "").endswith("+PTX"),
    reason="a build asked for PTX (TORCH_CUDA_ARCH_LIST=...+PTX) with the CUDA kernels",
)
def test_cuda_build_embeds_ptx_of_its_newest_architecture():
    """A GPU newer than any cubin JITs the PTX: without it a build made where no GPU was visible
    fails on Blackwell with 'no kernel image is available'."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    from fused_lstm._backend import LIBRARY

    def archs(flag):
        listing = subprocess.run(
            [tool, flag, str(LIBRARY)], capture_output=True, text=True, check=True
        ).stdout
        return {int(a) for a in re.findall(r"\.sm_(\d+)\.(?:cubin|ptx)", listing)}

    cubins, ptx = archs("--list-elf"), archs("--list-ptx")
    assert cubins, "the native library holds no CUDA kernels"
    assert max(cubins) in ptx, f"cubins for sm_{sorted(cubins)}, PTX for {sorted(ptx)}"


# ---- the SASS check (benchmarks/cuda_resources.py, issue 33 item 1) --------------------------


@pytest.fixture(scope="module")
def sass_tool():
    tool = load_script("cuda_resources")
    if not tool.CUOBJDUMP.exists():
        pytest.skip("no cuobjdump (triton's)")
    return tool


@pytest.mark.skipif(
    os.environ.get("FUSED_LSTM_EXPECT_CUDA") != "1",
    reason="set FUSED_LSTM_EXPECT_CUDA=1 where the build must include CUDA kernels",
)
def test_sass_check_passes_on_the_built_step_kernels(sass_tool):
    """CI's SASS check: the build's sm_90 step kernels spill nowhere and stay within
    sass_limits.json's ceilings, which name exactly the kernels built. The kernels of the
    bfloat16 B16 H768 step, forward and backward, meet issue 33's targets, and the backward's
    192 blocks fit one wave."""
    pytest.importorskip("fused_lstm._emulated_cuda")  # the tile widths
    library = sass_tool.find_library("sm_90")
    assert library is not None, "no sm_90 cubins in the build (TORCH_CUDA_ARCH_LIST)"
    limits = json.loads(sass_tool.LIMITS.read_text())
    rows = sass_tool.measure(*sass_tool.read_library(library, "sm_90"), "step_kernel", 768, [16])
    assert sass_tool.problems(rows, limits) == []
    assert {r.name for r in rows} == set(limits["ceilings"])
    for name in (
        "forward_step_kernel<bf16, float, 16, false>",
        "backward_step_kernel<bf16, float, 8, true, false>",
    ):
        row = next(r for r in rows if r.name == name)
        assert not sass_tool.over_targets(row.trips, row.tiles, limits["targets"]), name
        assert row.waves[16] is not None and row.waves[16] <= 1, name  # picked at B16


def _sass(*lines):
    """A kernel k in cuobjdump -sass's layout, one instruction per line at 0x10 strides."""
    body = "".join(f"        /*{16 * n:04x}*/    {line} ;\n" for n, line in enumerate(lines))
    return f"\t\tFunction : k\n{body}"


def test_sass_check_trip_model_and_failures(sass_tool):
    """The trip model's rules (cuda_resources.py's docstring) on hand-written SASS, and what
    fails the check: a spill (LDL/STL) and a step kernel over its ceiling."""
    kernel = sass_tool.parse_sass(
        _sass(
            "LDG.E.128 R4, desc[UR4][R2.64]",  # before the wait: R4..R7 pending
            "ACQBULK",
            "LDG.E R8, desc[UR4][R2.64+0x10]",
            "FADD R0, R7, R7",  # reads the last register of the 128-bit load: trip 1, both retire
            "LDG.E.64 R10, desc[UR4][R2.64+0x20]",  # loop: issued ahead for the next tile
            "FADD R0, R11, R0",  # trip per tile (the pair's upper half)
            "LDG.E.64 R10, desc[UR4][R2.64+0x30]",
            "BRA 0x50",  # the loop: 0x50 to here
            "STL [R1], R0",
            "EXIT",
        )
    )["k"]
    trips = sass_tool.trips(kernel)
    assert trips == sass_tool.Trips(0, 1, 1, 1, 1)
    assert trips.after_wait(3) == 1 + 1 + 2
    assert sass_tool.local_memory_count(kernel) == 1
    name = "forward_step_kernel<bf16, float, 16, false>"
    row = sass_tool.KernelRow(name, {}, kernel, sass_tool.StepKernel.parse(name), tiles=3)
    limits = {"ceilings": {name: {"per_tile": 1, "per_step_after_wait": 2}}}
    assert sass_tool.problems([row], limits) == [
        f"{name}: spills (1 local-memory instructions or bytes)",
        f"{name}: per_step_after_wait 4 > ceiling 2",
    ]


@pytest.mark.skipif(
    not os.access(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin/nvcc"), os.X_OK
    ),
    reason="no nvcc in CUDA_HOME",
)
@pytest.mark.parametrize("kernel,per_tile", [("consumed_at_once", 4), ("hoisted", 1)])
def test_sass_check_flags_a_load_consumed_at_once_in_a_loop(sass_tool, kernel, per_tile):
    """tests/data/planted_trips.cu, compiled for sm_90: four loads per tile, each consumed at once
    (a trip each, over the targets) or issued together first (one trip per tile, within them)."""
    _, sass = sass_tool.compile_sass(Path(__file__).parent / "data/planted_trips.cu", "sm_90")
    trips = sass_tool.trips(sass_tool.parse_sass(sass)[kernel])
    assert (trips.loops, trips.per_tile, trips.before_wait) == (1, per_tile, 0)
    targets = json.loads(sass_tool.LIMITS.read_text())["targets"]
    missed = sass_tool.over_targets(trips, 3, targets)
    assert bool(missed) == (per_tile > targets["per_tile"]), missed


# ---- the ops against the reference ----------------------------------------------------------


@pytest.mark.backends("emulated_cuda", "cuda")
def test_native_cuda_op_runs_and_matches_reference(backend):
    dev = backend.device
    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(T, B, I, device=dev, dtype=dt)
    h0, c0 = torch.randn(B, P, device=dev, dtype=dt), torch.randn(B, H, device=dev, dtype=dt)
    w_ih, w_hh = (
        torch.randn(4 * H, I, device=dev, dtype=dt),
        torch.randn(4 * H, P, device=dev, dtype=dt),
    )
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
        for gy, gh, gc in [
            (None, torch.randn_like(h), None),
            (None, None, torch.randn_like(c0)),
            (torch.randn_like(y), torch.randn_like(h), torch.randn_like(c0)),
        ]:
            bargs = (
                gy,
                gh,
                gc,
                x,
                None,
                h,
                c0,
                w_ih,
                whh,
                w_hr if proj else None,
                y,
                gates,
                cells,
                reverse,
            )
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
    cpu = [
        torch.randn(batch, I),
        torch.randn(batch, H),
        torch.randn(batch, H),
        torch.randn(4 * H, I),
        torch.randn(4 * H, H),
        *((torch.randn(4 * H), torch.randn(4 * H)) if bias else (None, None)),
    ]
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
    for gh, gc in [
        (torch.randn_like(h), torch.randn_like(c)),
        (torch.randn_like(h), None),
        (None, torch.randn_like(c)),
        (None, None),
    ]:
        bargs = (gh, gc, *args[:5], gates, cells)
        check(
            torch.ops.fused_lstm.cell_backward(*bargs),
            reference.cell_backward(*(None if t is None else t.cpu().double() for t in bargs)),
        )


# ---- sizes that cross every tile of the kernels ----------------------------------------------
#
# step_kernels.cuh: a block holds kWarps = 8 hidden units (forward) or dh components (backward);
# reductions go through shared memory a tile of columns at a time (forward over Hr, backward over
# 4H), whose width depends on the dtype and the batch tile; batch rows go in tiles of BT = 1, 2,
# 4, 8 or 16 (at most 8 in float64 and in the backward). The emulated module reports both
# (batch_tile, tile_columns), so the sizes below follow the kernels. Rows are read in 16-byte
# vectors, padded by the host where their length is not a whole number of vectors (odd Hr in
# float64, Hr % 4 != 0 in float32), so both kinds of row occur.

# hidden: a size, or "fwd" / "bwd": 4 past a forward tile of Hr / 3 units past a backward tile
# of 4H at this dtype and batch.
TILES = [
    # dtype, hidden, proj, batch, packed lengths (None: padded)
    pytest.param(torch.float64, 13, 0, 1, None, id="f64-H13-2blocks-B1-padded-rows"),
    pytest.param(torch.float64, 13, 0, 2, None, id="f64-H13-B2"),
    pytest.param(torch.float64, 14, 0, 3, None, id="f64-H14-B3-vector-rows"),
    pytest.param(torch.float64, 13, 5, 6, None, id="f64-H13-proj-B6"),
    pytest.param(
        torch.float64,
        9,
        0,
        19,
        [4, 4, 4, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1],
        id="f64-H9-B19-3batchtiles-packed",
    ),
    pytest.param(torch.float64, "bwd", 0, 11, None, id="f64-bwd-4H-2tiles-B11-remainder"),
    pytest.param(torch.float64, "bwd", 20, 3, [3, 2, 1], id="f64-proj-bwd-4H-2tiles-packed"),
    pytest.param(torch.float64, "fwd", 0, 3, [2, 2, 1], id="f64-fwd-Hr-2tiles-packed"),
    pytest.param(torch.float32, 12, 0, 17, None, id="f32-H12-B17-2batchtiles-vector-rows"),
    pytest.param(torch.float32, "fwd", 0, 17, None, id="f32-fwd-Hr-2tiles-B17"),
]

# float32 against nn.LSTM in float32: rounding of sums in another order.
TILE_TOL = {torch.float64: dict(atol=1e-9, rtol=1e-7), torch.float32: dict(atol=2e-5, rtol=1e-4)}


def tile_hidden(dtype, hidden, batch):
    if isinstance(hidden, int):
        return hidden
    emu = pytest.importorskip("fused_lstm._emulated_cuda")
    backward = hidden == "bwd"
    cols = emu.tile_columns(dtype, emu.batch_tile(dtype, batch, backward, False), backward)
    return cols // 4 + 3 if backward else cols + 4


def tile_inputs(dev, dtype, hidden, proj, batch, lengths):
    lstm = make_lstm(
        dev, 1, True, False, True, proj, dtype=dtype, hidden=tile_hidden(dtype, hidden, batch)
    )
    x, hx = make_inputs(lstm, dtype, steps=max(lengths) if lengths else 2, batch=batch)
    return lstm, x, hx


@needs_emulator
@pytest.mark.parametrize("dtype,hidden,proj,batch,lengths", TILES)
def test_tile_crossing_sizes_match_nn_lstm_in_two_orders(dtype, hidden, proj, batch, lengths):
    """Emulated, against nn.LSTM on the CPU; then the same case with the blocks and the threads
    between barriers run in another order must give bitwise the same result (a race on shared
    or global memory would change it)."""
    lstm, x, hx = tile_inputs("cpu", dtype, hidden, proj, batch, lengths)
    fused = FusedLSTM.from_lstm(lstm)
    want = run_lstm(lstm, x, hx, lengths)
    runs = []
    for order in ("forward", "shuffle"):
        with emulated_cuda(order=order, seed=3) as run:
            runs.append(run_lstm(fused, x, hx, lengths))
        assert run.launches > 0
    names = grad_names(lstm, True)
    compare(runs[0], want, names, **TILE_TOL[dtype])
    for name, a, b in zip(names, *runs, strict=True):
        assert torch.equal(a, b), f"{name} differs between thread orders"


@needs_emulator
def test_batch_tiles_and_tile_widths():
    """The batch tiles the kernels choose, which the cases above cross; every tile is a whole
    number of the warp's 16-byte loads."""
    emu = pytest.importorskip("fused_lstm._emulated_cuda")
    batches = (1, 2, 3, 5, 9, 17)
    want16, want8 = [1, 2, 4, 8, 16, 16], [1, 2, 4, 8, 8, 8]
    assert [emu.batch_tile(torch.float32, b, False, False) for b in batches] == want16
    for dtype, backward, regs in itertools.product(
        (F64, torch.float32), (False, True), (False, True)
    ):
        if dtype == torch.float32 and not backward and not regs:
            continue
        assert [emu.batch_tile(dtype, b, backward, regs) for b in batches] == want8
    for dtype in (F64, torch.float32, torch.float16, torch.bfloat16):
        vec = 16 * 8 // torch.finfo(dtype).bits
        for bt, backward in itertools.product((1, 2, 4, 8, 16), (False, True)):
            assert emu.tile_columns(dtype, bt, backward) % (32 * vec) == 0, (dtype, bt, backward)


@needs_cuda
@pytest.mark.parametrize("dtype,hidden,proj,batch,lengths", TILES)
def test_tile_crossing_sizes_on_gpu(dtype, hidden, proj, batch, lengths):
    lstm, x, hx = tile_inputs("cuda", dtype, hidden, proj, batch, lengths)
    with torch.backends.cudnn.flags(enabled=False):
        want = run_lstm(lstm, x, hx, lengths)
    got = run_lstm(FusedLSTM.from_lstm(lstm), x, hx, lengths)
    compare(got, want, grad_names(lstm, True), **TILE_TOL[dtype])


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


class HostTraffic(TorchDispatchMode):
    """Records the ATen calls that copy host memory into a CUDA tensor or wait for the device,
    what a call captured in a CUDA graph must not make."""

    SYNCS = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.is_nonzero.default,
        torch.ops.aten.nonzero.default,
    }

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SYNCS:
            self.seen.append(str(func))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src, dst = (
                (args[1], args[0].device)
                if func is torch.ops.aten.copy_.default
                else (
                    args[0],
                    kwargs.get("device") or args[0].device,
                )
            )
            if src.device.type == "cpu" and torch.device(dst).type == "cuda" and src.dim() > 0:
                self.seen.append(f"{func} of {tuple(src.shape)} from the host")
        return func(*args, **kwargs)


@needs_extension
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cuda_forward_copies_nothing_from_the_host(packed):
    """Capturable without a GPU (issue 33, item 4): fused_lstm::lstm in training with every
    option (packed, bidirectional, projection, reset, every dropout, zoneout) on fake CUDA
    tensors, which need no GPU, runs the op's C++ (its autograd's forward, up to the layer ops'
    fake kernels) and makes no copy from the host into a CUDA tensor and no wait for the device.
    Below it, the kernels' launch path takes every parameter by value (step_loops.cuh); the
    backward needs a GPU's autograd engine, and the GPU's own check is the graph capture test
    below. The module itself reads batch_sizes on the host first, as nn.LSTM does (a CPU
    tensor), which fake tensors cannot, so the test calls the op."""
    lengths = [T, T - 1, 2]
    batch_sizes = torch.tensor([sum(n > t for n in lengths) for t in range(T)])
    with FakeTensorMode(allow_non_fake_inputs=True):
        m = FusedLSTM(I, H, 2, bidirectional=True, proj_size=P, device="cuda")
        shape = (sum(lengths),) if packed else (T, B)
        x = torch.randn(*shape, I, device="cuda")
        h0, c0 = torch.zeros(4, B, P, device="cuda"), torch.zeros(4, B, H, device="cuda")
        reset = torch.zeros(shape, dtype=torch.bool, device="cuda")
        with HostTraffic() as traffic:
            torch.ops.fused_lstm.lstm.default(
                x,
                batch_sizes if packed else None,
                h0,
                c0,
                m._weights(),
                True,
                True,
                2,
                0.2,
                True,
                True,
                reset=reset,
                recurrent_dropout=0.2,
                zoneout_cell=0.1,
                zoneout_hidden=0.3,
                weight_drop=0.3,
            )
    assert traffic.seen == []


@needs_cuda
@pytest.mark.parametrize("reset", [False, True], ids=["", "reset"])
@pytest.mark.parametrize("proj", [0, P], ids=["plain", "proj"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_training_step_captured_in_a_cuda_graph_matches_eager(proj, packed, reset):
    """A whole training step (forward, backward, SGD update) of a bidirectional LSTM captured in
    a CUDA graph and replayed gives bitwise what eager gives: the kernels read nothing from the
    host per call and make no host synchronisation (docs/cuda.md#cuda-graphs), resets included."""
    lstm = make_lstm("cuda", 2, True, False, True, proj)
    x, hx = make_inputs(lstm, torch.float32)
    x, hx = x.detach(), tuple(h.detach() for h in hx)
    lengths = torch.tensor([5, 4, 2])
    inp = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True) if packed else x
    flags = torch.zeros(x.shape[:2], dtype=torch.bool, device="cuda")
    flags[2, 0] = flags[3, 1] = True

    def step(model, opt):
        out, (h_n, c_n) = model(inp, hx, reset=flags if reset else None)
        data = out.data if packed else out
        loss = data.square().sum() + h_n.sum() + c_n.sum()
        loss.backward()
        opt.step()
        return loss.detach()

    models = [FusedLSTM.from_lstm(lstm) for _ in range(2)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    eager, graphed = models
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
        for model, opt in zip(models, opts):
            for _ in range(2):
                opt.zero_grad(set_to_none=True)
                step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opts[1].zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        captured_loss = step(graphed, opts[1])
    for _ in range(3):
        opts[0].zero_grad(set_to_none=False)
        eager_loss = step(eager, opts[0])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured_loss, eager_loss)
        for (name, a), b in zip(graphed.named_parameters(), eager.parameters(), strict=True):
            assert torch.equal(a, b), f"{name} after the replayed step differs from eager"
            assert torch.equal(a.grad, b.grad), f"{name}.grad differs from eager"


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

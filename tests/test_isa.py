"""The CPU kernels' ISA variants (csrc/cpu/isa.h): each one this CPU runs, forced with
FUSED_LSTM_CPU_ISA, agrees with nn.LSTM in float64 on every path of a step's product, and a value
that names no variant this CPU runs fails fused_lstm's import with an error naming the variable.

The ISA is chosen once per process, so each variant runs in a process of its own: this file
imported there, running every_path()."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMCell, native_backends, reference
from helpers import assert_same, cell_outputs_and_grads, outputs_and_grads

pytestmark = pytest.mark.skipif("cpu" not in native_backends(), reason="needs the CPU kernels")

ISAS = ("avx512", "avx2", "baseline")  # every variant's name, widest first
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fused_lstm.__file__)))


def run_python(code, isa, tmp_path=None):
    """code in a fresh interpreter that finds this fused_lstm and the tests' modules, with
    FUSED_LSTM_CPU_ISA = isa (unset for None)."""
    env = {k: v for k, v in os.environ.items() if k != "FUSED_LSTM_CPU_ISA"}
    if isa is not None:
        env["FUSED_LSTM_CPU_ISA"] = isa
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, *env.get("PYTHONPATH", "").split(os.pathsep)])
    return subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=300,
    )


def supported():
    return fused_lstm._C.cpu_isas()


# (B, H, proj, T, bidirectional): a batch of one row (VecMatRows: its split tiles at H = 20, its
# sweep of W^T at H = 200), panel row tiles and their remainders (11 rows: 8 + 2 + 1, 6 + 4 + 1,
# 4 + 4 + 2 + 1), 13 rows at H = 200 (gate blocks fused with the gate math, split across the
# threads), projections, and one-step calls (W read in place).
SIZES = [
    (1, 20, 0, 5, True),
    (1, 200, 0, 3, False),
    (1, 20, 7, 4, True),
    (11, 20, 0, 4, True),
    (13, 200, 0, 2, False),
    (9, 24, 5, 3, True),
    (3, 20, 0, 1, True),
    (40, 36, 0, 1, False),
]


def every_path(dtype):
    """FusedLSTM and FusedLSTMCell against nn.LSTM and nn.LSTMCell in float64, at SIZES, and the
    regularised layer ops against the reference; dtype float32 runs the float kernels against
    the float64 modules within float32's error."""
    atol = 1e-9 if dtype == torch.float64 else 3e-5
    for B, H, proj, T, bidirectional in SIZES:
        ref = nn.LSTM(5, H, proj_size=proj, bidirectional=bidirectional, dtype=torch.float64)
        fused = FusedLSTM.from_lstm(ref).to(dtype)
        x = torch.randn(T, B, 5, dtype=torch.float64, requires_grad=True)
        x_in = x.detach().to(dtype).requires_grad_()
        want = outputs_and_grads(ref, x, None, [x])
        assert_same(
            [w.to(dtype) for w in want], outputs_and_grads(fused, x_in, None, [x_in]), atol=atol
        )
    ref_cell = nn.LSTMCell(5, 20, dtype=torch.float64)
    cell = FusedLSTMCell.from_lstm_cell(ref_cell).to(dtype)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    x_in = x.detach().to(dtype).requires_grad_()
    want = cell_outputs_and_grads(ref_cell, x, None, [x])
    assert_same(
        [w.to(dtype) for w in want], cell_outputs_and_grads(cell, x_in, None, [x_in]), atol=atol
    )
    regularised_layer(dtype, atol)


def regularised_layer(dtype, atol):
    """The gate math's zoneout and reset variants: the layer ops with every mask and a reset,
    forward and backward, against the reference."""
    T, B, I, H = 4, 9, 5, 20
    f = {"dtype": dtype}
    args = [
        torch.randn(T, B, I, **f),
        None,
        torch.randn(B, H, **f),
        torch.randn(B, H, **f),
        torch.randn(4 * H, I, **f) * 0.3,
        torch.randn(4 * H, H, **f) * 0.3,
        torch.randn(4 * H, **f),
        torch.randn(4 * H, **f),
        None,
        False,
        torch.bernoulli(torch.full((B, H), 0.7, **f)) / 0.7,
        torch.bernoulli(torch.full((T, B, H), 0.4, **f)),
        torch.bernoulli(torch.full((T, B, H), 0.3, **f)),
        torch.rand(T, B) < 0.2,
    ]
    want = reference.layer_forward(*args)
    got = torch.ops.fused_lstm.layer_forward(*args)
    assert_same(want, got, atol=atol)
    grads = [torch.randn(T, B, H, **f), torch.randn(B, H, **f), torch.randn(B, H, **f)]
    backward_args = [*grads, *args[:6], None, *want[:1], *want[3:], False, *args[10:]]
    assert_same(
        reference.layer_backward(*backward_args),
        torch.ops.fused_lstm.layer_backward(*backward_args),
        atol=atol,
    )


def masks():
    """keep_mask's masks from a fixed seed, in each floating dtype: counter-based, the same bits
    whatever the ISA."""
    torch.manual_seed(0)
    return [
        torch.ops.fused_lstm.keep_mask(torch.empty(0, dtype=dtype), [4097], 0.3, 2.0)
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    ]


CHILD = """
import sys, torch, fused_lstm, test_isa
assert fused_lstm._C.cpu_isa() == {isa!r}, fused_lstm._C.cpu_isa()
torch.manual_seed(0)
test_isa.every_path(torch.float64)
test_isa.every_path(torch.float32)
torch.save(test_isa.masks(), sys.argv[1] + "/masks.pt")
"""


@pytest.mark.parametrize("isa", ISAS)
def test_each_isa_agrees_with_nn_lstm(isa, tmp_path):
    if isa not in supported():
        pytest.skip(f"this CPU does not run the {isa} kernels")
    done = run_python(CHILD.format(isa=isa), isa, tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    for got, want in zip(torch.load(tmp_path / "masks.pt"), masks(), strict=True):
        assert torch.equal(got, want)


def test_the_default_is_the_widest():
    assert supported()[-1] == "baseline"
    assert [isa for isa in ISAS if isa in supported()] == supported()
    done = run_python("import fused_lstm; print(fused_lstm._C.cpu_isa())", None)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [supported()[0]]


@pytest.mark.parametrize("value", [*ISAS, "AVX2", "sse9"])
def test_an_isa_this_cpu_does_not_run_fails_the_import(value):
    if value in supported():
        pytest.skip(f"this CPU runs the {value} kernels")
    done = run_python("import fused_lstm", value)
    assert done.returncode != 0
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("ValueError: fused_lstm: FUSED_LSTM_CPU_ISA=" + value), error
    assert "this CPU runs: " + ", ".join(supported()) in error, error
    if value not in ISAS:
        assert "(avx512, avx2, baseline)" in error, error

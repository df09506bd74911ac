"""The nn.LSTM surface beyond forward: parameters, state dicts, construction, native dispatch."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMCell, reference


@pytest.mark.parametrize("kw", [dict(), dict(num_layers=3, bidirectional=True, proj_size=4),
                                dict(bias=False, num_layers=2)])
def test_parameters_and_state_dict_match_nn_lstm(kw):
    ref = nn.LSTM(5, 7, **kw)
    fused = FusedLSTM(5, 7, **kw)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == \
        [(n, p.shape) for n, p in fused.named_parameters()]
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)
    assert [[w.shape for w in ws] for ws in ref.all_weights] == \
        [[w.shape for w in ws] for ws in fused.all_weights]
    assert repr(ref).replace("LSTM", "X") == repr(fused).replace("FusedLSTM", "X")
    fused.flatten_parameters()


def test_initialisation_matches_nn_lstm():
    torch.manual_seed(3)
    ref = nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    fused = FusedLSTM(5, 7, num_layers=2, bidirectional=True)
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(4)
    cell_ref = nn.LSTMCell(5, 7)
    torch.manual_seed(4)
    cell = FusedLSTMCell(5, 7)
    for a, b in zip(cell_ref.parameters(), cell.parameters()):
        assert torch.equal(a, b)


def test_meta_device_construction():
    fused = FusedLSTM(5, 7, num_layers=2, proj_size=3, device="meta")
    assert all(p.is_meta for p in fused.parameters())
    out, (h, c) = fused(torch.randn(4, 2, 5, device="meta"))
    assert out.shape == (4, 2, 3) and h.shape == (2, 2, 3) and c.shape == (2, 2, 7)


def test_not_an_rnn_base_subclass():
    assert not issubclass(FusedLSTM, nn.RNNBase)


def test_native_op_runs_not_the_fallback(monkeypatch):
    if "cpu" not in fused_lstm.native_backends():
        pytest.skip("extension not built")

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran instead of the native op")

    monkeypatch.setattr(reference, "layer_forward", fail)
    monkeypatch.setattr(reference, "layer_backward", fail)
    fused = FusedLSTM(3, 4, bidirectional=True)
    out, _ = fused(torch.randn(5, 2, 3, requires_grad=True))
    out.sum().backward()


class RecordOps(TorchDispatchMode):
    """The names of the ops that reach the kernels (below autograd), in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.backends("cpu", "cuda")
@pytest.mark.parametrize("bias,batched", [(True, True), (False, False)])
def test_cell_runs_the_cell_ops(monkeypatch, backend, bias, batched):
    """FusedLSTMCell's forward and backward are the native cell ops: not the layer ops with one
    step, not the reference."""
    device = backend.device
    def fail(*args, **kwargs):
        raise AssertionError("the reference ran instead of the native op")

    monkeypatch.setattr(reference, "cell_forward", fail)
    monkeypatch.setattr(reference, "cell_backward", fail)
    cell = FusedLSTMCell(3, 4, bias=bias, device=device)
    x = torch.randn(*((2,) if batched else ()), 3, device=device, requires_grad=True)
    with RecordOps() as forward:
        h, c = cell(x)
    with RecordOps() as backward:
        (h.sum() + c.sum()).backward()
    assert forward.names.count("fused_lstm::cell_forward") == 1
    assert backward.names.count("fused_lstm::cell_backward") == 1
    assert not any(n.startswith("fused_lstm::layer") for n in forward.names + backward.names)


class RecordCalls(TorchFunctionMode):
    """The names of the fused_lstm ops called from Python (above autograd), in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.OpOverload) and func.namespace == "fused_lstm":
            self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("packed", [False, True])
def test_lstm_is_one_op_call(packed):
    """FusedLSTM calls the lstm op once, whatever its layers and directions; the op reaches the
    kernels as one layer_forward per layer and direction, its backward one layer_backward."""
    fused = FusedLSTM(3, 4, num_layers=3, bidirectional=True, dropout=0.5)
    x = torch.randn(5, 2, 3, requires_grad=True)
    inp = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3])) if packed else x
    with RecordCalls() as calls, RecordOps() as kernels:
        out, _ = fused(inp)
    assert calls.names == ["fused_lstm::lstm"]
    assert [n for n in kernels.names if n.startswith("fused_lstm")] == \
        ["fused_lstm::layer_forward"] * 6
    with RecordOps() as backward:
        (out.data if packed else out).sum().backward()
    assert [n for n in backward.names if n.startswith("fused_lstm")] == \
        ["fused_lstm::layer_backward"] * 6


@pytest.mark.parametrize("module,name", [(lambda: FusedLSTM(3, 4), "layer_forward"),
                                         (lambda: FusedLSTMCell(3, 4), "cell_forward")])
def test_reference_only_switch(monkeypatch, module, name):
    calls = []
    real = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a: calls.append(1) or real(*a))
    with fused_lstm.reference_only():
        module()(torch.randn(2, 3) if name == "cell_forward" else torch.randn(5, 2, 3))
    assert calls


def test_native_backends_reports_cpu_when_built():
    """The CPU counts as native when every op the modules run has a CPU kernel."""
    assert fused_lstm.native_backends() <= {"cpu", "cuda"}
    ops = [f"fused_lstm::{kind}_{way}" for kind in ("layer", "cell")
           for way in ("forward", "backward")]
    has_cpu_kernels = hasattr(torch.ops, "fused_lstm") and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU") for op in ops)
    assert ("cpu" in fused_lstm.native_backends()) == has_cpu_kernels


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cpu(dtype):
    ref = nn.LSTM(4, 8, dtype=dtype)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(6, 2, 4, dtype=dtype)
    out, (h, c) = fused(x)
    assert out.dtype == h.dtype == c.dtype == dtype
    exact, _ = FusedLSTM.from_lstm(ref).double()(x.double())
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)


def test_import_without_the_extension_says_how_to_build():
    """The extension declares the ops; without it, import fails with a message, not later."""
    code = ("import sys; sys.modules['fused_lstm._C'] = None\n"
            "try:\n    import fused_lstm\nexcept ImportError as e:\n    print(e)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=root).stdout
    assert "fused_lstm._C is missing" in out and "pip install --no-build-isolation -e ." in out

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
import fused_lstm.testing
from fused_lstm import FusedLSTM, FusedLSTMCell, reference
from helpers import needs_extension


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(num_layers=3, bidirectional=True, proj_size=4), dict(bias=False, num_layers=2)],
)
def test_parameters_and_state_dict_match_nn_lstm(kw):
    ref = nn.LSTM(5, 7, **kw)
    fused = FusedLSTM(5, 7, **kw)
    assert [(n, p.shape) for n, p in ref.named_parameters()] == [
        (n, p.shape) for n, p in fused.named_parameters()
    ]
    fused.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(fused.state_dict(), strict=True)
    assert [[w.shape for w in ws] for ws in ref.all_weights] == [
        [w.shape for w in ws] for ws in fused.all_weights
    ]
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


@needs_extension
def test_native_op_runs_not_the_fallback(monkeypatch):
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
    assert [n for n in kernels.names if n.startswith("fused_lstm")] == [
        "fused_lstm::layer_forward"
    ] * 6
    with RecordOps() as backward:
        (out.data if packed else out).sum().backward()
    assert [n for n in backward.names if n.startswith("fused_lstm")] == [
        "fused_lstm::layer_backward"
    ] * 6


@pytest.mark.parametrize(
    "module,name",
    [(lambda: FusedLSTM(3, 4), "layer_forward"), (lambda: FusedLSTMCell(3, 4), "cell_forward")],
)
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
    ops = [
        f"fused_lstm::{kind}_{way}" for kind in ("layer", "cell") for way in ("forward", "backward")
    ]
    has_cpu_kernels = hasattr(torch.ops, "fused_lstm") and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU") for op in ops
    )
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


def _run_python(code: str, **env: str) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env={**os.environ, **env},
    ).stdout


def test_without_the_extension_everything_runs_on_the_reference():
    """An install with no extension (FUSED_LSTM_NO_EXTENSION=1, or no compiler): the same ops,
    no native backend, the reference's values and gradients, and one warning at first use."""
    code = """if True:
        import warnings
        import torch
        import fused_lstm
        assert fused_lstm.native_backends() == set()
        assert not hasattr(fused_lstm, "_C")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ref = torch.nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2, dtype=torch.float64)
            fused = fused_lstm.FusedLSTM.from_lstm(ref)
            cell = fused_lstm.FusedLSTMCell(3, 4)
        print(sum("no native kernels" in str(w.message) for w in caught), "warning")
        x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
        diffs = []
        for module in (ref, fused):
            out, (h, c) = module(x)
            loss = (out * out).sum() + h.sum() + c.sin().sum()
            diffs.append([out, *torch.autograd.grad(loss, [x, *module.parameters()])])
        print(max((a - b).abs().max().item() for a, b in zip(*diffs)))
    """
    out = _run_python(code, FUSED_LSTM_NO_EXTENSION="1").split()
    assert out[:2] == ["1", "warning"] and float(out[2]) < 1e-12


def test_an_extension_that_does_not_load_is_an_error_that_says_how_to_rebuild():
    """Built but broken (another torch's build, a missing library): not silently the reference."""
    code = """if True:
        import importlib.abc, importlib.machinery, sys
        class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path, target=None):
                if name == "fused_lstm._C":
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ImportError("undefined symbol: _ZN3c10")
            def exec_module(self, module):
                pass
        sys.meta_path.insert(0, Broken())
        try:
            import fused_lstm
        except ImportError as e:
            print(e)
    """
    out = _run_python(code, FUSED_LSTM_NO_EXTENSION="0")
    assert "fused_lstm._C does not load (undefined symbol" in out, out
    assert "pip install --no-build-isolation -e ." in out and "FUSED_LSTM_NO_EXTENSION=1" in out


@pytest.mark.skipif(
    os.environ.get("FUSED_LSTM_BUILD_EMULATOR") != "1",
    reason="set FUSED_LSTM_BUILD_EMULATOR=1 where the install must include the CUDA emulator (CI)",
)
def test_emulator_is_built_where_the_install_asked_for_it():
    assert fused_lstm.testing.emulator_built()


def test_emulated_cuda_without_the_emulator_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(fused_lstm.testing, "emulator_built", lambda: False)
    with pytest.raises(
        RuntimeError, match="FUSED_LSTM_BUILD_EMULATOR=1 pip install --no-build-isolation -e ."
    ):
        with fused_lstm.testing.emulated_cuda():
            pass

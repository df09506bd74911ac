"""The nn.LSTM surface beyond forward: parameters, state dicts, construction, native dispatch."""

import pytest
import torch
from torch import nn

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


def test_reference_only_switch(monkeypatch):
    calls = []
    real = reference.layer_forward
    monkeypatch.setattr(reference, "layer_forward", lambda *a: calls.append(1) or real(*a))
    with fused_lstm.reference_only():
        FusedLSTM(3, 4)(torch.randn(5, 2, 3))
    assert calls


def test_native_backends_reports_cpu_when_built():
    assert fused_lstm.native_backends() <= {"cpu", "cuda"}
    has_cpu_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "fused_lstm::layer_forward", "CPU") if hasattr(torch.ops, "fused_lstm") else False
    assert ("cpu" in fused_lstm.native_backends()) == bool(has_cpu_kernel)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_cpu(dtype):
    ref = nn.LSTM(4, 8, dtype=dtype)
    fused = FusedLSTM.from_lstm(ref)
    x = torch.randn(6, 2, 4, dtype=dtype)
    out, (h, c) = fused(x)
    assert out.dtype == h.dtype == c.dtype == dtype
    exact, _ = FusedLSTM.from_lstm(ref).double()(x.double())
    torch.testing.assert_close(out.double(), exact, atol=2e-2, rtol=2e-2)

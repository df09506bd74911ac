"""Bad arguments and inputs raise what nn.LSTM / nn.LSTMCell raise, with the same messages."""

import re
import warnings

import pytest
import torch
from torch import nn

from fused_lstm import FusedLSTM, FusedLSTMCell


def raises_like(make_ref, make_fused):
    """Both callables raise the same exception type with the same message."""
    with pytest.raises(Exception) as ref_err:
        make_ref()
    with pytest.raises(type(ref_err.value), match=re.escape(str(ref_err.value))):
        make_fused()
    return str(ref_err.value)


@pytest.mark.parametrize("kwargs", [
    dict(input_size=0, hidden_size=3), dict(input_size=2, hidden_size=0),
    dict(input_size=2.0, hidden_size=3), dict(input_size=2, hidden_size="3"),
    dict(input_size=2, hidden_size=3, num_layers=0), dict(input_size=2, hidden_size=3, dropout=1.5),
    dict(input_size=2, hidden_size=3, dropout=True), dict(input_size=2, hidden_size=3, bias=1),
    dict(input_size=2, hidden_size=3, batch_first=None),
    dict(input_size=2, hidden_size=3, proj_size=-1), dict(input_size=2, hidden_size=3, proj_size=3),
])
def test_constructor_errors(kwargs):
    raises_like(lambda: nn.LSTM(**kwargs), lambda: FusedLSTM(**kwargs))


def test_dropout_warning_single_layer():
    for cls in (nn.LSTM, FusedLSTM):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cls(2, 3, dropout=0.2)
        assert any("non-zero dropout expects num_layers greater than 1" in str(x.message) for x in w)


def pair(**kw):
    ref = nn.LSTM(10, 20, num_layers=2, **kw)
    return ref, FusedLSTM.from_lstm(ref)


@pytest.mark.parametrize("make_input,make_hx", [
    (lambda: torch.randn(5, 3, 7), None),                               # wrong input_size
    (lambda: torch.randn(5, 3, 10, 1), None),                           # 4-D
    (lambda: torch.randn(10), None),                                    # 1-D
    (lambda: torch.randn(5, 3, 10), lambda: (torch.zeros(2, 3, 21), torch.zeros(2, 3, 20))),
    (lambda: torch.randn(5, 3, 10), lambda: (torch.zeros(2, 3, 20), torch.zeros(2, 4, 20))),
    (lambda: torch.randn(5, 3, 10), lambda: (torch.zeros(3, 20), torch.zeros(3, 20))),
    (lambda: torch.randn(5, 10), lambda: (torch.zeros(2, 1, 20), torch.zeros(2, 1, 20))),
    (lambda: torch.randn(5, 3, 10, dtype=torch.float64), None),         # dtype vs weights
])
def test_forward_errors(make_input, make_hx):
    ref, fused = pair()
    x = make_input()
    hx = make_hx() if make_hx else None
    raises_like(lambda: ref(x, hx), lambda: fused(x, hx))


def test_documented_messages():
    ref, fused = pair()
    assert raises_like(lambda: ref(torch.randn(5, 3, 7)), lambda: fused(torch.randn(5, 3, 7))) == \
        "input.size(-1) must be equal to input_size. Expected 10, got 7"
    hx = (torch.zeros(2, 3, 21), torch.zeros(2, 3, 20))
    x = torch.randn(5, 3, 10)
    assert raises_like(lambda: ref(x, hx), lambda: fused(x, hx)) == \
        "Expected hidden[0] size (2, 3, 20), got [2, 3, 21]"
    x4 = torch.randn(1, 5, 3, 10)
    assert raises_like(lambda: ref(x4), lambda: fused(x4)) == \
        "LSTM: Expected input to be 2D or 3D, got 4D instead"


def test_hidden_dtype_mismatch():
    """nn.LSTM on the CPU fails here with oneDNN's 'get_mkldnn_dtype: unsupported data type';
    FusedLSTM raises the same type with the message nn.LSTM gives on its non-oneDNN path."""
    ref, fused = pair()
    x = torch.randn(5, 3, 10)
    hx = (torch.zeros(2, 3, 20, dtype=torch.float64), torch.zeros(2, 3, 20, dtype=torch.float64))
    with pytest.raises(RuntimeError):
        ref(x, hx)
    with pytest.raises(RuntimeError, match="Input and hidden tensors are not the same dtype"):
        fused(x, hx)


@pytest.mark.parametrize("make_input,make_hx", [
    (lambda: torch.randn(3, 7), None),
    (lambda: torch.randn(3, 4, 10), None),
    (lambda: torch.randn(3, 10), lambda: (torch.zeros(2, 20), torch.zeros(2, 20))),
    (lambda: torch.randn(3, 10), lambda: (torch.zeros(3, 21), torch.zeros(3, 20))),
    (lambda: torch.randn(3, 10), lambda: (torch.zeros(3, 20, 1), torch.zeros(3, 20))),
])
def test_cell_errors(make_input, make_hx):
    ref = nn.LSTMCell(10, 20)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x = make_input()
    hx = make_hx() if make_hx else None
    raises_like(lambda: ref(x, hx), lambda: fused(x, hx))

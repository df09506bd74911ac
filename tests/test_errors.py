"""Bad arguments and inputs raise what nn.LSTM / nn.LSTMCell raise, with the same messages. The
modules raise these before any op runs, so each test runs once, not per backend."""

import re
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTM, FusedLSTMCell


def raises_like(make_ref, make_fused):
    """Both callables raise the same exception type with the same message."""
    with pytest.raises(Exception) as ref_err:
        make_ref()
    with pytest.raises(type(ref_err.value), match=re.escape(str(ref_err.value))):
        make_fused()
    return str(ref_err.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(input_size=0, hidden_size=3),
        dict(input_size=2, hidden_size=0),
        dict(input_size=2.0, hidden_size=3),
        dict(input_size=2, hidden_size="3"),
        dict(input_size=2, hidden_size=3, num_layers=0),
        dict(input_size=2, hidden_size=3, dropout=1.5),
        dict(input_size=2, hidden_size=3, dropout=True),
        dict(input_size=2, hidden_size=3, bias=1),
        dict(input_size=2, hidden_size=3, batch_first=None),
        dict(input_size=2, hidden_size=3, proj_size=-1),
        dict(input_size=2, hidden_size=3, proj_size=3),
    ],
)
def test_constructor_errors(kwargs):
    raises_like(lambda: nn.LSTM(**kwargs), lambda: FusedLSTM(**kwargs))


def test_dropout_warning_single_layer():
    for cls in (nn.LSTM, FusedLSTM):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            cls(2, 3, dropout=0.2)
        assert any(
            "non-zero dropout expects num_layers greater than 1" in str(x.message) for x in w
        )


def pair(**kw):
    ref = nn.LSTM(10, 20, num_layers=2, **kw)
    return ref, FusedLSTM.from_lstm(ref)


@pytest.mark.parametrize(
    "make_input,make_hx",
    [
        (lambda: torch.randn(5, 3, 7), None),  # wrong input_size
        (lambda: torch.randn(5, 3, 10, 1), None),  # 4-D
        (lambda: torch.randn(10), None),  # 1-D
        (lambda: torch.randn(5, 3, 10), lambda: (torch.zeros(2, 3, 21), torch.zeros(2, 3, 20))),
        (lambda: torch.randn(5, 3, 10), lambda: (torch.zeros(2, 3, 20), torch.zeros(2, 4, 20))),
        (lambda: torch.randn(5, 3, 10), lambda: (torch.zeros(3, 20), torch.zeros(3, 20))),
        (lambda: torch.randn(5, 10), lambda: (torch.zeros(2, 1, 20), torch.zeros(2, 1, 20))),
        (lambda: torch.randn(5, 3, 10, dtype=torch.float64), None),  # dtype vs weights
    ],
)
def test_forward_errors(make_input, make_hx):
    ref, fused = pair()
    x = make_input()
    hx = make_hx() if make_hx else None
    raises_like(lambda: ref(x, hx), lambda: fused(x, hx))


def test_documented_messages():
    ref, fused = pair()
    assert (
        raises_like(lambda: ref(torch.randn(5, 3, 7)), lambda: fused(torch.randn(5, 3, 7)))
        == "input.size(-1) must be equal to input_size. Expected 10, got 7"
    )
    hx = (torch.zeros(2, 3, 21), torch.zeros(2, 3, 20))
    x = torch.randn(5, 3, 10)
    assert (
        raises_like(lambda: ref(x, hx), lambda: fused(x, hx))
        == "Expected hidden[0] size (2, 3, 20), got [2, 3, 21]"
    )
    x4 = torch.randn(1, 5, 3, 10)
    assert (
        raises_like(lambda: ref(x4), lambda: fused(x4))
        == "LSTM: Expected input to be 2D or 3D, got 4D instead"
    )


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


@pytest.mark.parametrize(
    "make_input,make_hx",
    [
        (lambda: torch.randn(3, 7), None),
        (lambda: torch.randn(3, 4, 10), None),
        (lambda: torch.randn(3, 10), lambda: (torch.zeros(2, 20), torch.zeros(2, 20))),
        (lambda: torch.randn(3, 10), lambda: (torch.zeros(3, 21), torch.zeros(3, 20))),
        (lambda: torch.randn(3, 10), lambda: (torch.zeros(3, 20, 1), torch.zeros(3, 20))),
    ],
)
def test_cell_errors(make_input, make_hx):
    ref = nn.LSTMCell(10, 20)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x = make_input()
    hx = make_hx() if make_hx else None
    raises_like(lambda: ref(x, hx), lambda: fused(x, hx))


@pytest.mark.parametrize(
    "shape,batch_first",
    [
        ((0, 3, 10), False),
        ((3, 0, 10), True),
        ((0, 10), False),
        ((0, 10), True),
        ((0, 0, 10), False),
    ],
)
def test_sequence_length_zero(shape, batch_first):
    ref, fused = pair(batch_first=batch_first)
    x = torch.randn(*shape)
    assert (
        raises_like(lambda: ref(x), lambda: fused(x))
        == "Expected sequence length to be larger than 0 in RNN"
    )


def test_hx_must_be_a_pair():
    ref, fused = pair()
    x, h = torch.randn(5, 3, 10), torch.zeros(2, 3, 20)
    assert (
        raises_like(lambda: ref(x, (h, h, h)), lambda: fused(x, (h, h, h)))
        == "lstm expects two hidden states"
    )
    # Where nn.LSTM fails on the way (hx[1] out of range, its argument parser) or goes on with
    # the first two entries (unbatched input), FusedLSTM says what is wrong.
    with pytest.raises(IndexError):
        ref(x, (h,))
    with pytest.raises(RuntimeError, match="^lstm expects two hidden states$"):
        fused(x, (h,))
    with pytest.raises(TypeError):
        ref(x, torch.stack([h, h]))
    with pytest.raises(
        TypeError,
        match=r"^LSTM: hx must be a tuple \(h_0, c_0\) of two tensors, "
        "got Tensor$",
    ):
        fused(x, torch.stack([h, h]))
    ref(x[:, 0], (h[:, 0],) * 3)
    with pytest.raises(RuntimeError, match="^lstm expects two hidden states$"):
        fused(x[:, 0], (h[:, 0],) * 3)


def test_cell_hx_must_be_a_pair():
    ref = nn.LSTMCell(10, 20)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x, h = torch.randn(3, 10), torch.zeros(3, 20)
    for hx in ((h,), (h, h, h)):
        assert (
            raises_like(lambda: ref(x, hx), lambda: fused(x, hx))
            == "lstm_cell expects two hidden states"
        )
    with pytest.raises(TypeError):
        ref(x, torch.stack([h, h]))
    with pytest.raises(
        TypeError,
        match=r"^LSTMCell: hx must be a tuple \(h_0, c_0\) of two "
        "tensors, got Tensor$",
    ):
        fused(x, torch.stack([h, h]))
    # Unbatched, nn.LSTMCell reads the first two entries (rows) of either and goes on.
    ref(x[0], (h[0],) * 3)
    ref(x[0], torch.stack([h[0], h[0]]))
    with pytest.raises(RuntimeError, match="^lstm_cell expects two hidden states$"):
        fused(x[0], (h[0],) * 3)
    with pytest.raises(TypeError, match="hx must be a tuple"):
        fused(x[0], torch.stack([h[0], h[0]]))


STATE_DTYPE_ERROR = (
    "Input and hidden tensors are not the same dtype, found input tensor with "
    "Double and hidden tensor with {}"
)


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("dtype,name", [(torch.float32, "Float"), (torch.int64, "Long")])
def test_state_dtype_mismatch(k, dtype, name):
    """A float64 input with one state of another dtype. nn.LSTM on the CPU fails inside a matmul
    for h_0 and promotes c_0 silently; FusedLSTM (and FusedLSTMCell) refuse both, with the
    message nn.LSTM gives on the GPU."""
    ref, fused = pair(dtype=torch.float64)
    ref_cell = nn.LSTMCell(10, 20, dtype=torch.float64)
    cell = FusedLSTMCell.from_lstm_cell(ref_cell)
    for ref_module, module, x, state in (
        (ref, fused, torch.randn(5, 3, 10), torch.zeros(2, 3, 20)),
        (ref_cell, cell, torch.randn(3, 10), torch.zeros(3, 20)),
    ):
        x = x.double()
        hx = [state.double(), state.double()]
        hx[k] = hx[k].to(dtype)
        if k == 0:
            with pytest.raises(RuntimeError):
                ref_module(x, tuple(hx))
        else:
            ref_module(x, tuple(hx))
        with pytest.raises(RuntimeError, match=re.escape(STATE_DTYPE_ERROR.format(name))):
            module(x, tuple(hx))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_cell_input_dtype_mismatch(dtype):
    """nn.LSTMCell's error comes from a matmul ('mat1 and mat2 must have the same dtype');
    FusedLSTMCell raises the same type with nn.LSTM's wording."""
    ref = nn.LSTMCell(10, 20, dtype=torch.float64)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x = torch.ones(3, 10, dtype=dtype)
    with pytest.raises(RuntimeError):
        ref(x)
    with pytest.raises(
        RuntimeError,
        match=re.escape(
            f"LSTMCell input dtype ({dtype}) does not match weight dtype (torch.float64). "
            f"Convert input: input.to(torch.float64), or convert model: model.to({dtype})"
        ),
    ):
        fused(x)


OTHER_DEVICES = [
    "meta",
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    ),
]


@pytest.mark.parametrize("other", OTHER_DEVICES)
@pytest.mark.parametrize("where", ["input", "h0", "c0", "weights"])
def test_device_mismatch(other, where):
    """One of input, h_0, c_0 or the weights on another device: nn.LSTM's messages. nn.LSTMCell
    fails in whichever op first meets two devices; FusedLSTMCell raises the same type with
    nn.LSTM's messages."""
    for ref, x, state in (
        (nn.LSTM(10, 20), torch.randn(5, 3, 10), torch.zeros(1, 3, 20)),
        (nn.LSTMCell(10, 20), torch.randn(3, 10), torch.zeros(3, 20)),
    ):
        fused = (
            FusedLSTM.from_lstm(ref)
            if isinstance(ref, nn.LSTM)
            else FusedLSTMCell.from_lstm_cell(ref)
        )
        hx = [state, state.clone()]
        if where == "input":
            x = x.to(other)
        elif where == "weights":
            ref, fused = ref.to(other), fused.to(other)
        else:
            hx[where == "c0"] = hx[where == "c0"].to(other)
        if isinstance(ref, nn.LSTM):
            message = raises_like(lambda: ref(x, tuple(hx)), lambda: fused(x, tuple(hx)))
        else:
            with pytest.raises(RuntimeError):
                ref(x, tuple(hx))
            with pytest.raises(RuntimeError) as err:
                fused(x, tuple(hx))
            message = str(err.value)
        kind = "hidden" if where != "weights" else "parameter"
        assert re.fullmatch(
            f"Input and {kind} tensors are not at the same device, found input "
            f"tensor at .+ and {kind} tensor at .+",
            message,
        )


@pytest.mark.parametrize(
    "hx_shapes,message",
    [
        (((2, 2, 20), (2, 2, 20)), "Expected hidden[0] size (2, 3, 20), got [2, 2, 20]"),
        (((2, 3, 20), (2, 3, 21)), "Expected hidden[1] size (2, 3, 20), got [2, 3, 21]"),
        (((3, 20), (3, 20)), "Expected hidden[0] size (2, 3, 20), got [3, 20]"),
    ],
)
def test_packed_hidden_size(hx_shapes, message):
    """With a PackedSequence nn.LSTM compares hx's size with a tuple holding the tensor
    batch_sizes[0] and fails on the way (a broadcasting error, 'got an incorrect number of RNN
    parameters', an IndexError); FusedLSTM gives the message nn.LSTM means."""
    ref, fused = pair()
    packed = pack_sequence([torch.randn(4, 10), torch.randn(3, 10), torch.randn(1, 10)])
    hx = tuple(torch.zeros(s) for s in hx_shapes)
    with pytest.raises(Exception):
        ref(packed, hx)
    with pytest.raises(RuntimeError, match=f"^{re.escape(message)}$"):
        fused(packed, hx)

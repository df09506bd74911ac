"""FusedLSTM and FusedLSTMCell: the nn.LSTM / nn.LSTMCell surface over the ops
``fused_lstm::lstm`` and ``fused_lstm::cell_forward``: validation in Python, then one op call.

Deliberately not subclasses of ``nn.RNNBase``: Dynamo refuses to trace those, and the point of
owning the module is that it can be compiled. Parameter names, shapes, order, initialisation,
validation and error messages follow torch/nn/modules/rnn.py so that state dicts, optimisers and
error-handling code written for nn.LSTM keep working.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.nn.utils.rnn import PackedSequence

from . import _backend  # noqa: F401  (the ops)
from . import _onnx


def _apply_permutation(tensor: Tensor, permutation: Tensor | None, dim: int = 1) -> Tensor:
    return tensor if permutation is None else tensor.index_select(dim, permutation)


def _check_size_arg(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero")


def _autocast_dtype(x: Tensor, via_cudnn: bool) -> torch.dtype | None:
    """The dtype nn.LSTM / nn.LSTMCell compute in under CUDA autocast, or None without it.
    nn.LSTM on cuDNN goes through cuDNN's autocast wrapper, which casts to float16 whatever the
    autocast dtype (aten/src/ATen/cudnn/AutocastRNN.cpp); off cuDNN, and for the cell, ATen's
    autocast dtype applies. float64 stays float64, as autocast leaves it."""
    if x.device.type != "cuda" or x.dtype == torch.float64 or not torch.is_autocast_enabled("cuda"):
        return None
    if via_cudnn and torch.backends.cudnn.enabled and torch.backends.cudnn.is_available():
        return torch.float16
    return torch.get_autocast_dtype("cuda")


def _cast(dtype: torch.dtype | None, *tensors: Tensor) -> list[Tensor]:
    # Tensor.to is differentiable: float32 weights get float32 gradients back.
    return [t if dtype is None or t.dtype == torch.float64 else t.to(dtype) for t in tensors]


class FusedLSTM(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.LSTM` running on fused kernels.

    Same constructor, parameters (names, shapes, order, initialisation), inputs (batched,
    unbatched, ``batch_first``, :class:`~torch.nn.utils.rnn.PackedSequence`), outputs and errors
    as ``nn.LSTM``; ``load_state_dict`` works both ways. See ``FusedLSTM.from_lstm``.
    """

    __constants__ = ["input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "dropout", "bidirectional", "proj_size"]

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if (not isinstance(dropout, numbers.Number) or isinstance(dropout, bool)
                or not 0 <= dropout <= 1):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an "
                "element being zeroed")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                "dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}", stacklevel=2)
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(
                f"batch_first should be of type bool, got: {type(batch_first).__name__}")
        _check_size_arg("input_size", input_size)
        _check_size_arg("hidden_size", hidden_size)
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections")
        if proj_size >= hidden_size:
            raise ValueError("proj_size has to be smaller than hidden_size")

        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size

        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else real_hidden * num_directions
            for direction in range(num_directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes = {"weight_ih": (4 * hidden_size, layer_input),
                          "weight_hh": (4 * hidden_size, real_hidden)}
                if bias:
                    shapes["bias_ih"] = (4 * hidden_size,)
                    shapes["bias_hh"] = (4 * hidden_size,)
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                names = []
                for kind, shape in shapes.items():
                    name = f"{kind}_l{layer}{suffix}"
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(name)
                self._flat_weights_names += names
                self._all_weights.append(names)
        self.reset_parameters()

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> "FusedLSTM":
        """A FusedLSTM with ``lstm``'s configuration and a copy of its parameters (same device
        and dtype), in the same training/eval mode."""
        p = lstm.weight_ih_l0
        fused = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias,
                    lstm.batch_first, lstm.dropout, lstm.bidirectional, lstm.proj_size,
                    device=p.device, dtype=p.dtype)
        fused.load_state_dict(lstm.state_dict())
        return fused.train(lstm.training)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """Kept for nn.LSTM compatibility; the kernels read PyTorch's layout, so nothing to do."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        return s.format(**self.__dict__)

    # -- validation, with nn.LSTM's messages ------------------------------------------------

    def _expected_sizes(self, mini_batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        lead = self.num_layers * (2 if self.bidirectional else 1)
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (lead, mini_batch, real_hidden), (lead, mini_batch, self.hidden_size)

    def _check_forward_args(self, input: Tensor, hx: tuple[Tensor, Tensor], is_packed: bool,
                            mini_batch: int) -> None:
        weight = self.weight_ih_l0
        if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
            raise ValueError(
                f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        expected_dim = 2 if is_packed else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.size(-1)}")
        for k, (state, expected) in enumerate(zip(hx, self._expected_sizes(mini_batch))):
            if state.dim() != len(expected) or any(
                    _known_unequal(have, want) for have, want in zip(state.shape, expected)):
                raise RuntimeError(f"Expected hidden[{k}] size {expected}, got {list(state.size())}")
            # For a PackedSequence under torch.compile, mini_batch is batch_sizes[0], a value the
            # compiler cannot read: the comparison above is undecided there (guard_or_false says
            # False) and this makes it a check at run time rather than a graph break.
            if not torch.jit.is_tracing():  # traced sizes are tensors, compared above
                torch._check(state.size(1) == mini_batch)
        _check_attributes(input, hx, self._flat_weights)

    # -- forward ------------------------------------------------------------------------------

    def forward(self, input, hx=None):
        x, batch_sizes, hx = self._prepare(input, hx)
        dtype = _autocast_dtype(x, via_cudnn=True)
        x, h0, c0, *weights = _cast(dtype, x, *hx, *self._flat_weights)
        # No exporter can convert the fused ops: under ONNX export the same call builds ONNX's
        # LSTM operator instead.
        lstm = _onnx.lstm if torch.onnx.is_in_onnx_export() else torch.ops.fused_lstm.lstm.default
        output, h_n, c_n = lstm(
            x, batch_sizes, h0, c0, weights, self.bias, self.proj_size > 0, self.num_layers,
            self.dropout, self.training, self.bidirectional)

        if isinstance(input, PackedSequence):
            _, _, sorted_indices, unsorted_indices = input
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, (_apply_permutation(h_n, unsorted_indices),
                            _apply_permutation(c_n, unsorted_indices))
        if self.batch_first:
            output = output.transpose(0, 1)
        if input.dim() == 2:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _prepare(self, input, hx) -> tuple[Tensor, Tensor | None, tuple[Tensor, Tensor]]:
        """Validates like nn.LSTM and returns what the op takes: the input time-major (or the
        packed data), the batch sizes (None unless packed) and (h_0, c_0) as (L*D, B, ·), in the
        packed batch order."""
        is_packed = isinstance(input, PackedSequence)
        if is_packed:
            if torch.onnx.is_in_onnx_export():
                raise RuntimeError(_onnx.PACKED_SEQUENCE_ERROR)
            data, batch_sizes, sorted_indices, _ = input
            mini_batch = int(batch_sizes[0])
            is_batched = True
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batch_sizes = sorted_indices = None
            is_batched = input.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            data = input if is_batched else input.unsqueeze(batch_dim)
            mini_batch = data.size(batch_dim)

        if hx is None:
            h_size, c_size = self._expected_sizes(mini_batch)
            hx = (data.new_zeros(h_size), data.new_zeros(c_size))
        else:
            _check_hx_pair(hx, "LSTM", "lstm")
            if not is_packed:
                want = 3 if is_batched else 2
                if hx[0].dim() != want or hx[1].dim() != want:
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {want}-D but got "
                        f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                if not is_batched:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        self._check_forward_args(data, hx, is_packed, mini_batch)
        if not is_packed and data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        if is_packed:
            hx = (_apply_permutation(hx[0], sorted_indices),
                  _apply_permutation(hx[1], sorted_indices))
        x = data.transpose(0, 1) if (self.batch_first and not is_packed) else data
        return x, batch_sizes, hx


def _known_unequal(have, want) -> bool:
    """``have != want`` where that is known: a SymInt comparison torch.compile cannot decide is
    False; under torch.jit.trace (the TorchScript ONNX exporter) sizes are 0-dim tensors, compared
    by their traced values."""
    differs = have != want
    return bool(differs) if isinstance(differs, Tensor) else guard_or_false(differs)


def _type_name(t: Tensor) -> str:
    """ATen's name of t's dtype ("Float", "Long", ...), as its error messages print it."""
    return t.type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _check_attributes(input: Tensor, states, weights) -> None:
    """ATen's check_attributes (aten/src/ATen/native/RNN.h) with its messages: the states have
    input's dtype and device, the weights its device. nn.LSTM checks the states' dtype on cuDNN
    only; on the CPU a float64 input with a float32 h_0 fails inside a matmul, and a float32 c_0
    next to a float64 input and h_0 is silently promoted. FusedLSTM and FusedLSTMCell check
    everywhere."""
    for state in states:
        if state.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
            raise RuntimeError(
                "Input and hidden tensors are not the same dtype, found input tensor with "
                f"{_type_name(input)} and hidden tensor with {_type_name(state)}")
        if state.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {state.device}")
    for w in weights:
        if w.device != input.device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor "
                f"at {input.device} and parameter tensor at {w.device}")


def _check_hx_pair(hx, module: str, aten_op: str) -> None:
    """hx is a pair (h_0, c_0). nn.LSTM / nn.LSTMCell raise these messages (from the ATen op
    ``aten_op``) for some wrong hx only: a 3-tuple next to a batched input, say. Others they
    index as they go, reading the first two entries of a 3-tuple or the first two rows of a
    tensor with an unbatched input."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(f"{module}: hx must be a tuple (h_0, c_0) of two tensors, got "
                        f"{type(hx).__name__}")
    if len(hx) != 2:
        raise RuntimeError(f"{aten_op} expects two hidden states")


class FusedLSTMCell(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.LSTMCell`: one fused step.

    Same parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``), inputs (batched
    2-D or unbatched 1-D, optional ``hx``) and errors as ``nn.LSTMCell``.
    """

    __constants__ = ["input_size", "hidden_size", "bias"]

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.weight_ih = nn.Parameter(torch.empty((4 * hidden_size, input_size), **factory))
        self.weight_hh = nn.Parameter(torch.empty((4 * hidden_size, hidden_size), **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(4 * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(4 * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        self.reset_parameters()

    @classmethod
    def from_lstm_cell(cls, cell: nn.LSTMCell) -> "FusedLSTMCell":
        """A FusedLSTMCell with ``cell``'s configuration and a copy of its parameters."""
        p = cell.weight_ih
        fused = cls(cell.input_size, cell.hidden_size, cell.bias, device=p.device, dtype=p.dtype)
        fused.load_state_dict(cell.state_dict())
        return fused

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.bias is not True:
            s += ", bias={bias}"
        return s.format(**self.__dict__)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if input.dim() not in (1, 2):
            raise ValueError(
                f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            _check_hx_pair(hx, "LSTMCell", "lstm_cell")
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.size(0), self.hidden_size)
            hx = (zeros, zeros)
        elif not is_batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        weights = [self.weight_ih, self.weight_hh]
        if self.bias:
            weights += [self.bias_ih, self.bias_hh]
        dtype = _autocast_dtype(input, via_cudnn=False)
        input, h0, c0, *weights = _cast(dtype, input, *hx, *weights)
        self._check(input, (h0, c0), weights)
        b_ih, b_hh = weights[2:] if self.bias else (None, None)
        if torch.onnx.is_in_onnx_export():  # no exporter can convert the fused ops
            h, c = _onnx.lstm_cell(input, h0, c0, weights[0], weights[1], b_ih, b_hh)
        else:
            # The op's C++ autograd differentiates it; its workspace (gates, cells) stays there.
            h, c, _, _ = torch.ops.fused_lstm.cell_forward.default(input, h0, c0, weights[0],
                                                                   weights[1], b_ih, b_hh)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    def _check(self, input: Tensor, hx: tuple[Tensor, Tensor], weights: list[Tensor]) -> None:
        # The size messages of ATen's check_rnn_cell_forward_input / _hidden, which nn.LSTMCell
        # raises. For a wrong dtype or device nn.LSTMCell has no check of its own (a matmul
        # fails, or promotes a float32 c_0); these name the tensors, as nn.LSTM does.
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} "
                f"expected {self.input_size}")
        for k, state in enumerate(hx):
            if input.size(0) != state.size(0):
                raise RuntimeError(
                    f"Input batch size {input.size(0)} doesn't match hidden{k} batch size "
                    f"{state.size(0)}")
            if state.size(1) != self.hidden_size:
                raise RuntimeError(
                    f"hidden{k} has inconsistent hidden_size: got {state.size(1)}, "
                    f"expected {self.hidden_size}")
        weight = weights[0]
        if input.dtype != weight.dtype:
            raise RuntimeError(
                f"LSTMCell input dtype ({input.dtype}) does not match weight dtype "
                f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert model: "
                f"model.to({input.dtype})")
        _check_attributes(input, hx, weights)

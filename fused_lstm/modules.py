"""FusedLSTM and FusedLSTMCell: the nn.LSTM / nn.LSTMCell surface over the ops
``fused_lstm::lstm`` and ``fused_lstm::cell_forward``: validation in Python, then one op call.

Deliberately not subclasses of ``nn.RNNBase``: Dynamo refuses to trace those, and the point of
owning the module is that it can be compiled. Parameter names, shapes, order, initialisation,
validation and error messages follow torch/nn/modules/rnn.py so that state dicts, optimisers and
error-handling code written for nn.LSTM keep working.

TorchScript compiles both forwards, as it compiles nn.LSTM's: ``torch.jit._overload_method`` gives
FusedLSTM a Tensor and a PackedSequence signature, and ``torch.jit.is_scripting()`` leaves out
what TorchScript cannot compile (autocast's casts, the ONNX branch, torch.compile's size checks;
the input dtype check, as nn.LSTM's scripted form leaves it out). The annotations of what
TorchScript compiles use ``typing`` (Optional, Tuple, List), which its parser reads.
"""

import math
import numbers
import warnings
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.nn.utils.rnn import PackedSequence

from . import _backend  # the ops
from . import _onnx


def _apply_permutation(tensor: Tensor, permutation: Optional[Tensor], dim: int = 1) -> Tensor:
    return tensor if permutation is None else tensor.index_select(dim, permutation)


def _check_size_arg(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero")


def _autocast_dtype(
    x: Tensor, lstm: bool, packed: bool = False, proj: bool = False
) -> torch.dtype | None:
    """The dtype nn.LSTM (``lstm``) or nn.LSTMCell computes in under autocast, or None where
    autocast leaves it alone. float64 stays float64, as autocast leaves it.

    - CUDA: nn.LSTM on cuDNN goes through cuDNN's autocast wrapper, which casts to float16
      whatever the autocast dtype (aten/src/ATen/cudnn/AutocastRNN.cpp); off cuDNN, and for the
      cell, ATen's autocast dtype applies.
    - CPU: autocast's lower-precision list holds aten::lstm's padded overload (lstm.input) but
      not the packed one (lstm.data) nor the cell's ops. Without a projection nn.LSTM runs on
      oneDNN: padded input in the autocast dtype, a PackedSequence in the input's own. With one
      it runs ATen's loop, whose products autocast recasts while the cell state keeps the
      input's dtype: FusedLSTM computes in the input's dtype, and _autocast_output_dtype gives
      output and h_n the autocast dtype. nn.LSTMCell computes in its own dtype.
    """
    if x.dtype == torch.float64:
        return None
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        if lstm and torch.backends.cudnn.enabled and torch.backends.cudnn.is_available():
            return torch.float16
        return torch.get_autocast_dtype("cuda")
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and lstm:
        # The states as nn.LSTM takes them: in the dtype it computes in.
        return x.dtype if packed or proj else torch.get_autocast_dtype("cpu")
    return None


def _autocast_output_dtype(x: Tensor, proj: bool) -> torch.dtype | None:
    """The dtype of nn.LSTM's output and h_n where it differs from the one it computes in: with
    a projection under CPU autocast, the autocast dtype (see _autocast_dtype)."""
    on = proj and x.device.type == "cpu" and x.dtype != torch.float64
    return torch.get_autocast_dtype("cpu") if on and torch.is_autocast_enabled("cpu") else None


def _cast(dtype: torch.dtype | None, *tensors: Tensor) -> list[Tensor]:
    # Tensor.to is differentiable: float32 weights get float32 gradients back.
    if dtype is None:
        return list(tensors)
    return [t if t.dtype == torch.float64 else t.to(dtype) for t in tensors]


class FusedLSTM(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.LSTM` running on fused kernels.

    Same constructor, parameters (names, shapes, order, initialisation), inputs (batched,
    unbatched, ``batch_first``, :class:`~torch.nn.utils.rnn.PackedSequence`), outputs and errors
    as ``nn.LSTM``; ``load_state_dict`` works both ways. See ``FusedLSTM.from_lstm``.

    Keyword-only regularisers, fused into the kernels (docs/regularisers.md); each
    can be changed later, like ``dropout``, and is identity at its default:

    * ``recurrent_dropout`` (0 <= p < 1): variational dropout of h_{t-1} where it enters the
      recurrent product, one mask per call, layer, direction and batch row (Gal & Ghahramani).
    * ``zoneout`` (a rate in [0, 1], or a pair (cell, hidden)): each step and unit keeps its
      previous c and h with that probability in training, and mixes them by the rate in eval
      (Krueger et al.).
    * ``weight_drop`` (0 <= p < 1): DropConnect on every ``weight_hh``, one mask per call
      (Merity et al.'s AWD-LSTM).

    ``forward(input, hx=None, reset=None)``: ``reset`` (bool, the input's shape without its
    feature dimension) marks where a batch row starts a new sequence; no state crosses it.
    """

    __constants__ = [
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
    ]
    _REGULARISERS = ("recurrent_dropout", "zoneout", "weight_drop")

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
        *,
        recurrent_dropout: float = 0.0,
        zoneout: float | tuple[float, float] = 0.0,
        weight_drop: float = 0.0,
    ) -> None:
        super().__init__()
        _backend.warn_if_no_extension()
        if (
            not isinstance(dropout, numbers.Number)
            or isinstance(dropout, bool)
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                "dropout should be a number in range [0, 1] representing the probability of an "
                "element being zeroed"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                "dropout expects num_layers greater than 1, but got "
                f"dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        if not isinstance(bias, bool):
            raise TypeError(f"bias should be of type bool, got: {type(bias).__name__}")
        if not isinstance(batch_first, bool):
            raise TypeError(
                f"batch_first should be of type bool, got: {type(batch_first).__name__}"
            )
        _check_size_arg("input_size", input_size)
        _check_size_arg("hidden_size", hidden_size)
        if num_layers <= 0:
            raise ValueError("num_layers must be greater than zero")
        if proj_size < 0:
            raise ValueError(
                "proj_size should be a positive integer or zero to disable projections"
            )
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
        self.recurrent_dropout = recurrent_dropout
        self.zoneout = zoneout
        self.weight_drop = weight_drop

        factory = {"device": device, "dtype": dtype}
        num_directions = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else real_hidden * num_directions
            for direction in range(num_directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes = {
                    "weight_ih": (4 * hidden_size, layer_input),
                    "weight_hh": (4 * hidden_size, real_hidden),
                }
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

    def __setattr__(self, name: str, value) -> None:
        # The regularisers are validated whenever they are set, not only by the constructor.
        if name in FusedLSTM._REGULARISERS:
            value = _regulariser_value(name, value)
            if name == "zoneout":
                # What the forward reads: (cell, hidden), one type whatever was given.
                rates = value if isinstance(value, tuple) else (value, value)
                super().__setattr__("_zoneout_rates", rates)
        super().__setattr__(name, value)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM) -> "FusedLSTM":
        """A FusedLSTM with ``lstm``'s configuration and a copy of its parameters (same device
        and dtype), in the same training/eval mode."""
        p = lstm.weight_ih_l0
        fused = cls(
            lstm.input_size,
            lstm.hidden_size,
            lstm.num_layers,
            lstm.bias,
            lstm.batch_first,
            lstm.dropout,
            lstm.bidirectional,
            lstm.proj_size,
            device=p.device,
            dtype=p.dtype,
        )
        fused.load_state_dict(lstm.state_dict())
        return fused.train(lstm.training)

    def reset_parameters(self) -> None:
        stdv = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -stdv, stdv)

    def flatten_parameters(self) -> None:
        """Kept for nn.LSTM compatibility; the kernels read PyTorch's layout, so nothing to do."""

    # TorchScript cannot compile these (a parameter looked up by a name held in a variable).
    __jit_unused_properties__ = ["_flat_weights", "all_weights"]

    @property
    def _flat_weights(self) -> list[Tensor]:
        return [getattr(self, name) for name in self._flat_weights_names]

    def __prepare_scriptable__(self) -> "FusedLSTM":
        # What the scripted forward reads for _flat_weights: the Parameters themselves, as in
        # nn.LSTM's scripted form, so that gradients reach them (also after jit.save / load) and
        # module.to() / double() (which swap the data in place) reach the list. Made whenever
        # the module is scripted, so a Parameter replaced before that is the one read.
        self._scripted_weights: List[Tensor] = self._flat_weights
        return self

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
        s = s.format(**self.__dict__)
        for name in FusedLSTM._REGULARISERS:
            value = getattr(self, name)
            if value != 0 and value != (0, 0):
                s += f", {name}={value}"
        return s

    # -- validation, with nn.LSTM's messages ------------------------------------------------

    def _expected_sizes(self, mini_batch: int) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
        lead = self.num_layers * (2 if self.bidirectional else 1)
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        return (lead, mini_batch, real_hidden), (lead, mini_batch, self.hidden_size)

    def _check_forward_args(
        self, input: Tensor, hx: Tuple[Tensor, Tensor], is_packed: bool, mini_batch: int
    ) -> None:
        weight = self.weight_ih_l0
        if not torch.jit.is_scripting():
            if input.dtype != weight.dtype and not torch._C._is_any_autocast_enabled():
                raise ValueError(
                    f"RNN input dtype ({input.dtype}) does not match weight dtype "
                    f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert "
                    f"model: model.to({input.dtype})"
                )
        expected_dim = 2 if is_packed else 3
        if input.dim() != expected_dim:
            raise RuntimeError(f"input must have {expected_dim} dimensions, got {input.dim()}")
        if self.input_size != input.size(-1):
            raise RuntimeError(
                "input.size(-1) must be equal to input_size. "
                f"Expected {self.input_size}, got {input.size(-1)}"
            )
        h_size, c_size = self._expected_sizes(mini_batch)
        for k, (state, expected) in enumerate([(hx[0], h_size), (hx[1], c_size)]):
            want0, want1, want2 = expected
            if (
                state.dim() != 3
                or _known_unequal(state.size(0), want0)
                or _known_unequal(state.size(1), want1)
                or _known_unequal(state.size(2), want2)
            ):
                raise RuntimeError(
                    f"Expected hidden[{k}] size {expected}, got {list(state.size())}"
                )
            # For a PackedSequence under torch.compile, mini_batch is batch_sizes[0], a value the
            # compiler cannot read: the comparison above is undecided there (guard_or_false says
            # False) and this makes it a check at run time rather than a graph break.
            if not torch.jit.is_scripting():
                if not torch.jit.is_tracing():  # traced sizes are tensors, compared above
                    torch._check(state.size(1) == mini_batch)
        _check_attributes(input, [hx[0], hx[1]], self._weights())

    def _weights(self) -> List[Tensor]:
        """_flat_weights, also where TorchScript runs (it cannot compile the property)."""
        if torch.jit.is_scripting():
            return self._scripted_weights
        return self._flat_weights

    # -- forward ------------------------------------------------------------------------------

    # TorchScript compiles forward once for each of these signatures (as nn.LSTM's); Python
    # calls the definition below them.
    @torch.jit._overload_method  # noqa: F811
    def forward(
        self,
        input: Tensor,
        hx: Optional[Tuple[Tensor, Tensor]] = None,
        reset: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        pass

    @torch.jit._overload_method  # noqa: F811
    def forward(
        self,
        input: PackedSequence,
        hx: Optional[Tuple[Tensor, Tensor]] = None,
        reset: Optional[Tensor] = None,
    ) -> Tuple[PackedSequence, Tuple[Tensor, Tensor]]:
        pass

    # reset is meant to be passed by keyword; it is not keyword-only because TorchScript cannot
    # compile keyword-only arguments with defaults.
    def forward(self, input, hx=None, reset=None):  # noqa: F811
        batch_sizes: Optional[Tensor] = None
        sorted_indices: Optional[Tensor] = None
        unsorted_indices: Optional[Tensor] = None
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
        else:
            data = input
        x, h0, c0 = self._validate(data, batch_sizes, sorted_indices, hx)
        if reset is not None:
            reset = self._validate_reset(reset, data, batch_sizes, sorted_indices)
        weights = self._weights()
        if not torch.jit.is_scripting():
            dtype = _autocast_dtype(
                x, lstm=True, packed=batch_sizes is not None, proj=self.proj_size > 0
            )
            x, h0, c0, *weights = _cast(dtype, x, h0, c0, *weights)
        output, h_n, c_n = _lstm(
            x,
            batch_sizes,
            h0,
            c0,
            weights,
            self.bias,
            self.proj_size > 0,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            reset,
            self.recurrent_dropout,
            self._zoneout_rates[0],
            self._zoneout_rates[1],
            self.weight_drop,
        )
        if not torch.jit.is_scripting():
            out_dtype = _autocast_output_dtype(x, self.proj_size > 0)
            if out_dtype is not None:
                output, h_n = output.to(out_dtype), h_n.to(out_dtype)

        if isinstance(input, PackedSequence):
            output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return output, (
                _apply_permutation(h_n, unsorted_indices),
                _apply_permutation(c_n, unsorted_indices),
            )
        if self.batch_first:
            output = output.transpose(0, 1)
        if input.dim() == 2:
            output = output.squeeze(0 if self.batch_first else 1)
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        return output, (h_n, c_n)

    def _validate(
        self,
        data: Tensor,
        batch_sizes: Optional[Tensor],
        sorted_indices: Optional[Tensor],
        hx: Optional[Tuple[Tensor, Tensor]],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Validates like nn.LSTM and returns what the op takes: the input time-major (or the
        packed data, with its batch_sizes) and h_0, c_0 as (L*D, B, ·), in the packed batch
        order."""
        is_packed = batch_sizes is not None
        if batch_sizes is not None:
            if not torch.jit.is_scripting():
                if _onnx.exporting():
                    raise RuntimeError(_onnx.PACKED_SEQUENCE_ERROR)
            mini_batch = int(batch_sizes[0])
            is_batched = True
        else:
            if data.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {data.dim()}D instead")
            is_batched = data.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                data = data.unsqueeze(batch_dim)
            mini_batch = data.size(batch_dim)

        if hx is None:
            h_size, c_size = self._expected_sizes(mini_batch)
            h0, c0 = data.new_zeros(h_size), data.new_zeros(c_size)
        else:
            if not torch.jit.is_scripting():  # TorchScript has checked hx's type
                _check_hx_pair(hx, "LSTM", "lstm")
            h0, c0 = hx[0], hx[1]
            if not is_packed:
                want = 3 if is_batched else 2
                if h0.dim() != want or c0.dim() != want:
                    kind = "batched 3-D" if is_batched else "unbatched 2-D"
                    raise RuntimeError(
                        f"For {kind} input, hx and cx should also be {want}-D but got "
                        f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                    )
                if not is_batched:
                    h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        self._check_forward_args(data, (h0, c0), is_packed, mini_batch)
        if not is_packed and data.size(1 if self.batch_first else 0) == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        h0 = _apply_permutation(h0, sorted_indices)
        c0 = _apply_permutation(c0, sorted_indices)
        x = data.transpose(0, 1) if (self.batch_first and not is_packed) else data
        return x, h0, c0

    def _validate_reset(
        self,
        reset: Tensor,
        data: Tensor,
        batch_sizes: Optional[Tensor],
        sorted_indices: Optional[Tensor],
    ) -> Tensor:
        """reset as the op takes it: time-major (T, B) rows, or the packed rows of a
        PackedSequence (from reset padded (T, B), or (B, T) with batch_first, in the original
        batch order; entries past a sequence's end are ignored)."""
        if not torch.jit.is_scripting():
            if not isinstance(reset, Tensor):
                raise TypeError(
                    f"FusedLSTM: reset must be a bool tensor, got {type(reset).__name__}"
                )
        if batch_sizes is not None:
            steps, batch = batch_sizes.size(0), int(batch_sizes[0])
            want = [batch, steps] if self.batch_first else [steps, batch]
            layout = "(B, T)" if self.batch_first else "(T, B)"
            what = f"padded {layout} for a PackedSequence input"
        else:
            want = list(data.shape[:-1])
            layout = "(T,)" if data.dim() == 2 else ("(B, T)" if self.batch_first else "(T, B)")
            what = f"{layout}, the input's shape without its feature dimension"
        if list(reset.shape) != want:
            raise ValueError(
                f"FusedLSTM: reset must have shape {what}, {want}; got {list(reset.shape)}"
            )
        if reset.dtype != torch.bool:
            if torch.jit.is_scripting():  # TorchScript cannot print a dtype
                raise ValueError("FusedLSTM: reset must be a bool tensor")
            else:
                raise ValueError(f"FusedLSTM: reset must be a bool tensor, got {reset.dtype}")
        if reset.device != data.device:
            raise RuntimeError(
                f"FusedLSTM: reset must be on the input's device ({data.device}), "
                f"got {reset.device}"
            )
        if self.batch_first:
            reset = reset.transpose(0, 1)
        if batch_sizes is None:
            return reset if data.dim() == 3 else reset.unsqueeze(1)
        # The packed rows: step t holds the first batch_sizes[t] rows in sorted order.
        sorted_reset = _apply_permutation(reset, sorted_indices)
        steps_idx = torch.arange(sorted_reset.size(1), device=batch_sizes.device)
        active = steps_idx.unsqueeze(0) < batch_sizes.unsqueeze(1)
        return sorted_reset[active.to(reset.device)]


# Each regulariser's rule, as its ValueError states it.
_RULES = {
    "recurrent_dropout": "recurrent_dropout should be a number in range [0, 1) representing the "
    "probability of an element being dropped",
    "weight_drop": "weight_drop should be a number in range [0, 1) representing the probability "
    "of an element being dropped",
    "zoneout": "zoneout should be a number or a pair (cell, hidden) of numbers in range [0, 1], "
    "the probability of a unit keeping its previous state",
}


def _regulariser_value(name: str, value):
    """A regulariser's value, checked: a float, or for zoneout a float or a pair of them."""
    if name == "zoneout" and isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{_RULES[name]}; got {value!r}")
        return (_rate(name, value[0]), _rate(name, value[1]))
    return _rate(name, value)


def _rate(name: str, value) -> float:
    # zoneout may be 1 (a unit that never updates); a dropout of 1 would zero everything.
    top_allowed = name == "zoneout"
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not 0 <= value <= 1
        or (value == 1 and not top_allowed)
    ):
        raise ValueError(f"{_RULES[name]}; got {value!r}")
    return float(value)


def _lstm(
    x: Tensor,
    batch_sizes: Optional[Tensor],
    h0: Tensor,
    c0: Tensor,
    weights: List[Tensor],
    has_biases: bool,
    has_proj: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    reset: Optional[Tensor] = None,
    recurrent_dropout: float = 0.0,
    zoneout_cell: float = 0.0,
    zoneout_hidden: float = 0.0,
    weight_drop: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """The op fused_lstm::lstm. No exporter can convert the fused ops: under ONNX export the same
    call builds ONNX's LSTM operator instead. TorchScript compiles the overload packet only
    (the op has one overload); eager mode calls the overload itself, which is what
    __torch_function__ modes and torch.compile see."""
    if torch.jit.is_scripting():
        return torch.ops.fused_lstm.lstm(
            x,
            batch_sizes,
            h0,
            c0,
            weights,
            has_biases,
            has_proj,
            num_layers,
            dropout,
            train,
            bidirectional,
            reset=reset,
            recurrent_dropout=recurrent_dropout,
            zoneout_cell=zoneout_cell,
            zoneout_hidden=zoneout_hidden,
            weight_drop=weight_drop,
        )
    else:
        if _onnx.exporting():
            # ONNX's LSTM has none of them; in eval, dropouts are the identity and export.
            if (
                reset is not None
                or zoneout_cell > 0
                or zoneout_hidden > 0
                or (train and (recurrent_dropout > 0 or weight_drop > 0))
            ):
                raise RuntimeError(_onnx.REGULARISER_ERROR)
            return _onnx.lstm(
                x,
                batch_sizes,
                h0,
                c0,
                weights,
                has_biases,
                has_proj,
                num_layers,
                dropout,
                train,
                bidirectional,
            )
        return torch.ops.fused_lstm.lstm.default(
            x,
            batch_sizes,
            h0,
            c0,
            weights,
            has_biases,
            has_proj,
            num_layers,
            dropout,
            train,
            bidirectional,
            reset=reset,
            recurrent_dropout=recurrent_dropout,
            zoneout_cell=zoneout_cell,
            zoneout_hidden=zoneout_hidden,
            weight_drop=weight_drop,
        )


def _known_unequal(have: int, want: int) -> bool:
    """``have != want`` where that is known: a SymInt comparison torch.compile cannot decide is
    False; under torch.jit.trace (the TorchScript ONNX exporter) sizes are 0-dim tensors, compared
    by their traced values. TorchScript's sizes are ints."""
    if torch.jit.is_scripting():
        return have != want
    else:
        differs = have != want
        return bool(differs) if isinstance(differs, Tensor) else guard_or_false(differs)


def _type_name(t: Tensor) -> str:
    """ATen's name of t's dtype ("Float", "Long", ...), as its error messages print it."""
    return t.type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _check_attributes(input: Tensor, states: List[Tensor], weights: List[Tensor]) -> None:
    """ATen's check_attributes (aten/src/ATen/native/RNN.h) with its messages: the states have
    input's dtype and device, the weights its device. nn.LSTM checks the states' dtype on cuDNN
    only; on the CPU a float64 input with a float32 h_0 fails inside a matmul, and a float32 c_0
    next to a float64 input and h_0 is silently promoted. FusedLSTM and FusedLSTMCell check
    everywhere. TorchScript compiles the device checks; the op checks the dtypes there."""
    device = input.device
    for state in states:
        if not torch.jit.is_scripting():
            if state.dtype != input.dtype and not torch._C._is_any_autocast_enabled():
                raise RuntimeError(
                    "Input and hidden tensors are not the same dtype, found input tensor with "
                    f"{_type_name(input)} and hidden tensor with {_type_name(state)}"
                )
        if state.device != device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {state.device}"
            )
    for w in weights:
        if w.device != device:
            raise RuntimeError(
                "Input and parameter tensors are not at the same device, found input tensor "
                f"at {input.device} and parameter tensor at {w.device}"
            )


def _check_hx_pair(hx, module: str, aten_op: str) -> None:
    """hx is a pair (h_0, c_0). nn.LSTM / nn.LSTMCell raise these messages (from the ATen op
    ``aten_op``) for some wrong hx only: a 3-tuple next to a batched input, say. Others they
    index as they go, reading the first two entries of a 3-tuple or the first two rows of a
    tensor with an unbatched input."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(
            f"{module}: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}"
        )
    if len(hx) != 2:
        raise RuntimeError(f"{aten_op} expects two hidden states")


class FusedLSTMCell(nn.Module):
    r"""Drop-in replacement for :class:`torch.nn.LSTMCell`: one fused step.

    Same parameters (``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh``), inputs (batched
    2-D or unbatched 1-D, optional ``hx``) and errors as ``nn.LSTMCell``.
    """

    __constants__ = ["input_size", "hidden_size", "bias"]

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__()
        _backend.warn_if_no_extension()
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

    def forward(
        self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tensor]:
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            if not torch.jit.is_scripting():  # TorchScript has checked hx's type
                _check_hx_pair(hx, "LSTMCell", "lstm_cell")
            for idx, value in enumerate([hx[0], hx[1]]):
                if value.dim() not in (1, 2):
                    raise ValueError(
                        f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead"
                    )
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
        if hx is None:
            h0 = c0 = input.new_zeros(input.size(0), self.hidden_size)
        else:
            h0, c0 = hx[0], hx[1]
            if not is_batched:
                h0, c0 = h0.unsqueeze(0), c0.unsqueeze(0)
        weights = [self.weight_ih, self.weight_hh]
        b_ih, b_hh = self.bias_ih, self.bias_hh
        if b_ih is not None and b_hh is not None:
            weights += [b_ih, b_hh]
        if not torch.jit.is_scripting():
            dtype = _autocast_dtype(input, lstm=False)
            input, h0, c0, *weights = _cast(dtype, input, h0, c0, *weights)
        self._check(input, h0, c0, weights)
        b_ih, b_hh = (weights[2], weights[3]) if len(weights) == 4 else (None, None)
        h, c = _lstm_cell(input, h0, c0, weights[0], weights[1], b_ih, b_hh)
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c

    def _check(self, input: Tensor, h0: Tensor, c0: Tensor, weights: List[Tensor]) -> None:
        # The size messages of ATen's check_rnn_cell_forward_input / _hidden, which nn.LSTMCell
        # raises. For a wrong dtype or device nn.LSTMCell has no check of its own (a matmul
        # fails, or promotes a float32 c_0); these name the tensors, as nn.LSTM does.
        if input.size(1) != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.size(1)} expected {self.input_size}"
            )
        B, H = input.size(0), self.hidden_size
        if h0.size(0) != B or h0.size(1) != H or c0.size(0) != B or c0.size(1) != H:
            for k, state in enumerate([h0, c0]):
                if B != state.size(0):
                    raise RuntimeError(
                        f"Input batch size {B} doesn't match hidden{k} batch size {state.size(0)}"
                    )
                if state.size(1) != H:
                    raise RuntimeError(
                        f"hidden{k} has inconsistent hidden_size: got {state.size(1)}, expected {H}"
                    )
        weight = weights[0]
        if not torch.jit.is_scripting():  # TorchScript cannot print a dtype; the op checks
            if input.dtype != weight.dtype:
                raise RuntimeError(
                    f"LSTMCell input dtype ({input.dtype}) does not match weight dtype "
                    f"({weight.dtype}). Convert input: input.to({weight.dtype}), or convert "
                    f"model: model.to({input.dtype})"
                )
        _check_attributes(input, [h0, c0], weights)


def _lstm_cell(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    """The op fused_lstm::cell_forward's (h, c), or ONNX's form of it under ONNX export, as
    _lstm. The op's C++ autograd differentiates it; its workspace (gates, cells) stays there."""
    if torch.jit.is_scripting():
        h, c, _, _ = torch.ops.fused_lstm.cell_forward(input, h0, c0, w_ih, w_hh, b_ih, b_hh)
        return h, c
    else:
        if _onnx.exporting():
            return _onnx.lstm_cell(input, h0, c0, w_ih, w_hh, b_ih, b_hh)
        h, c, _, _ = torch.ops.fused_lstm.cell_forward.default(
            input, h0, c0, w_ih, w_hh, b_ih, b_hh
        )
        return h, c

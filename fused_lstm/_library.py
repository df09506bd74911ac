"""The ops' schemas, declared here once, and their Python-side kernels.

Every op of the ``fused_lstm`` namespace is defined by :func:`define`, before the extension
``fused_lstm._C`` (where it is built) registers its native kernels and C++ autograd for them
with TORCH_LIBRARY_IMPL (csrc/cpu, csrc/cuda, csrc/autograd). :func:`register` then adds the
fake (meta) kernels, so torch.compile and FakeTensor trace the ops without running a kernel, and
the pure-PyTorch reference (:mod:`fused_lstm.reference`, the same signatures) as the kernel of
every device without a native one. In an install without the extension, the reference is every
op's kernel: the kernel ops with an autograd registered here that calls the handwritten
backward ops, as csrc/autograd does; ``lstm`` composed from them (reference.lstm); keep_mask as
``bernoulli_``."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference

KERNEL_OPS = ("layer_forward", "layer_backward", "cell_forward", "cell_backward")

SCHEMAS = [
    # One layer, one direction. Returns (output, h_n, c_n, gates, cells); gates and cells are
    # the workspace layer_backward needs.
    #
    # The regularisers and resets, each None for off (csrc/layer_ops.h checks them):
    #   recurrent_mask (B, Hr): h_{t-1} of batch row b enters the recurrent product (only) as
    #     h_{t-1} * recurrent_mask[b] (variational recurrent dropout's scaled mask).
    #   zoneout_cell: c_t = d c_{t-1} + (1 - d) (f c_{t-1} + i g), where d is the 0-dim
    #     zoneout_cell itself (a rate, in eval) or its element at c_t's row and unit (a keep
    #     mask shaped like cells, in training); cells saves this c_t.
    #   zoneout_hidden: h_t = d h_{t-1} + (1 - d) h~_t likewise, h~_t the layer's plain output
    #     (after the projection); shaped like output, and output is h_t.
    #   reset (bool, input's shape without the features): where true, the step of that row
    #     starts from zero state instead of the state of the previously visited step (or h0,
    #     c0). The rows are in the order of visit: for reverse = true, the caller passes a row's
    #     flag meaning "no state from the step after it" (lstm does).
    "layer_forward(Tensor input, Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, "
    "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, "
    "Tensor? recurrent_mask=None, Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None, "
    "Tensor? reset=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    # Handwritten backward of layer_forward. Any incoming gradient may be None (unused output).
    # Returns (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr);
    # grad_bias is the gradient of b_ih and of b_hh alike, grad_w_hr is empty without a
    # projection. The regularisers and resets are the forward's.
    "layer_backward(Tensor? grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
    "Tensor? batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
    "Tensor output, Tensor gates, Tensor cells, bool reverse, Tensor? recurrent_mask=None, "
    "Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None, Tensor? reset=None) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    # One step of nn.LSTMCell (no projection): input (B, I), h0 and c0 (B, H). Returns (h, c,
    # gates, cells); gates (B, 4H), the activations i, f, g, o, and cells (B, H), c again, are
    # the workspace cell_backward needs. c and cells are separate tensors so that the caller
    # may modify c in place (as nn.LSTMCell allows on the CPU) without touching the saved state.
    "cell_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
    "Tensor? b_hh) -> (Tensor, Tensor, Tensor, Tensor)",
    # Handwritten backward of cell_forward; either incoming gradient may be None. Returns
    # (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias), grad_bias as in
    # layer_backward.
    "cell_backward(Tensor? grad_h, Tensor? grad_c, Tensor input, Tensor h0, Tensor c0, "
    "Tensor w_ih, Tensor w_hh, Tensor gates, Tensor cells) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    # The regularisers' random masks: a tensor of `size` with like's dtype and device, each
    # element `value` with probability `prob` and 0 otherwise, drawn from the generator of
    # like's device. A CPU kernel of its own (csrc/cpu/keep_mask.cpp) because bernoulli_'s draws
    # there cost as much per unit as a seed-sized LSTM step; elsewhere it is bernoulli_.
    "keep_mask(Tensor like, SymInt[] size, float prob, float value) -> Tensor",
    # A whole nn.LSTM, like aten::lstm: every layer and direction through layer_forward, with
    # nn.LSTM's dropout between layers (training only, never after the last). input (T, B, I),
    # or packed data (N, I) with batch_sizes; hx (L*D, B, Hr), cx (L*D, B, H); params in
    # nn.LSTM's _flat_weights order. Returns (output, h_n, c_n). Its kernel and autograd:
    # csrc/autograd/lstm_op.cpp; reference.lstm without the extension.
    #
    # The regularisers (docs/regularisers.md), drawn from the generator of input's device in
    # training: recurrent_dropout (one mask per call, layer, direction and batch row),
    # zoneout_cell and zoneout_hidden (rates; per step and unit masks in training, the
    # expectation in eval), weight_drop (DropConnect on each w_hh, one mask per call). reset
    # (bool, input's shape without the features, as the user's sequence: true where a row
    # starts a new sequence at that step, in every layer and direction).
    "lstm(Tensor input, Tensor? batch_sizes, Tensor hx, Tensor cx, Tensor[] params, "
    "bool has_biases, bool has_proj, int num_layers, float dropout, bool train, "
    "bool bidirectional, *, Tensor? reset=None, float recurrent_dropout=0., "
    "float zoneout_cell=0., float zoneout_hidden=0., float weight_drop=0.) "
    "-> (Tensor, Tensor, Tensor)",
]
TAGS = {"keep_mask": (torch.Tag.nondeterministic_seeded,)}

# The error of a second backward through the handwritten backwards; the extension raises its own
# copy (csrc/autograd/kernel_ops.cpp), which the tests hold equal to this one.
DOUBLE_BACKWARD_ERROR = (
    "fused_lstm: double backward is not supported (differentiating gradients that were computed "
    "with create_graph=True through FusedLSTM, FusedLSTMCell, fused_lstm::lstm, "
    "fused_lstm::layer_forward or fused_lstm::cell_forward)"
)

_LIBRARIES: dict[str, torch.library.Library] = {}  # held for the process: the ops live as long


def _name(schema: str) -> str:
    return schema[: schema.index("(")]


def define(namespace: str = "fused_lstm", names: tuple[str, ...] | None = None) -> None:
    """Defines the ops of SCHEMAS (those in ``names``, else all) in ``namespace``, once: the
    fused_lstm ops, and the CUDA emulator's copies of the kernel ops (fused_lstm.testing)."""
    if namespace in _LIBRARIES:
        return
    lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "DEF")  # noqa: TOR901
    for schema in SCHEMAS:
        if names is None or _name(schema) in names:
            lib.define(schema, tags=TAGS.get(_name(schema), ()))


def _check_devices(input: Tensor, **tensors: Tensor | None) -> None:
    # The dispatcher sends a call whose tensors mix the meta device with a real one here, to
    # the fake kernel, rather than to a device kernel whose check_layer_args would refuse it.
    for name, t in tensors.items():
        if t is not None and t.device != input.device:
            raise RuntimeError(
                f"fused_lstm: {name} must be on the device of input "
                f"({input.device}), got {t.device}"
            )


def register(native: bool) -> None:
    """Fakes and reference kernels; ``native``: whether fused_lstm._C registered its kernels."""

    @torch.library.register_fake("fused_lstm::keep_mask")
    def _(like, size, prob, value):
        return like.new_empty(size)

    for name in KERNEL_OPS:
        torch.library.impl(f"fused_lstm::{name}", "CompositeExplicitAutograd")(
            getattr(reference, name)
        )
    if not native:
        # lstm decomposes, above autograd, into layer_forward calls, which the kernel ops'
        # autograd below makes differentiable, and traceable and redirectable as in a native
        # install. So it needs no fake kernel of its own (nor may it have one).
        torch.library.impl("fused_lstm::lstm", "CompositeImplicitAutograd")(reference.lstm)
        torch.library.impl("fused_lstm::keep_mask", "CompositeExplicitAutograd")(
            reference.keep_mask
        )
        register_python_autograd("fused_lstm")

    @torch.library.register_fake("fused_lstm::layer_forward")
    def _(
        input,
        batch_sizes,
        h0,
        c0,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
        w_hr,
        reverse,
        recurrent_mask=None,
        zoneout_cell=None,
        zoneout_hidden=None,
        reset=None,
    ):
        _check_devices(
            input,
            h0=h0,
            c0=c0,
            w_ih=w_ih,
            w_hh=w_hh,
            b_ih=b_ih,
            b_hh=b_hh,
            w_hr=w_hr,
            recurrent_mask=recurrent_mask,
            zoneout_cell=zoneout_cell,
            zoneout_hidden=zoneout_hidden,
            reset=reset,
        )
        H, Hr = w_hh.shape[0] // 4, w_hh.shape[1]
        lead = input.shape[:-1]
        return (
            input.new_empty(*lead, Hr),
            h0.new_empty(h0.shape),
            c0.new_empty(c0.shape),
            input.new_empty(*lead, 4 * H),
            input.new_empty(*lead, H),
        )

    @torch.library.register_fake("fused_lstm::layer_backward")
    def _(
        grad_output,
        grad_h_n,
        grad_c_n,
        input,
        batch_sizes,
        h0,
        c0,
        w_ih,
        w_hh,
        w_hr,
        output,
        gates,
        cells,
        reverse,
        recurrent_mask=None,
        zoneout_cell=None,
        zoneout_hidden=None,
        reset=None,
    ):
        _check_devices(
            input,
            grad_output=grad_output,
            grad_h_n=grad_h_n,
            grad_c_n=grad_c_n,
            h0=h0,
            c0=c0,
            w_ih=w_ih,
            w_hh=w_hh,
            w_hr=w_hr,
            output=output,
            gates=gates,
            cells=cells,
            recurrent_mask=recurrent_mask,
            zoneout_cell=zoneout_cell,
            zoneout_hidden=zoneout_hidden,
            reset=reset,
        )
        grad_w_hr: Tensor = w_hr.new_empty(w_hr.shape) if w_hr is not None else input.new_empty(0)
        return (
            input.new_empty(input.shape),
            h0.new_empty(h0.shape),
            c0.new_empty(c0.shape),
            w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]),
            grad_w_hr,
        )

    @torch.library.register_fake("fused_lstm::cell_forward")
    def _(input, h0, c0, w_ih, w_hh, b_ih, b_hh):
        _check_devices(input, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh)
        return (
            h0.new_empty(h0.shape),
            c0.new_empty(c0.shape),
            input.new_empty(input.shape[0], w_hh.shape[0]),
            c0.new_empty(c0.shape),
        )

    @torch.library.register_fake("fused_lstm::cell_backward")
    def _(grad_h, grad_c, input, h0, c0, w_ih, w_hh, gates, cells):
        _check_devices(
            input,
            grad_h=grad_h,
            grad_c=grad_c,
            h0=h0,
            c0=c0,
            w_ih=w_ih,
            w_hh=w_hh,
            gates=gates,
            cells=cells,
        )
        return (
            input.new_empty(input.shape),
            h0.new_empty(h0.shape),
            c0.new_empty(c0.shape),
            w_ih.new_empty(w_ih.shape),
            w_hh.new_empty(w_hh.shape),
            w_hh.new_empty(w_hh.shape[0]),
        )

    if not native:
        return

    @torch.library.register_fake("fused_lstm::lstm")
    def _(
        input,
        batch_sizes,
        hx,
        cx,
        params,
        has_biases,
        has_proj,
        num_layers,
        dropout,
        train,
        bidirectional,
        *,
        reset=None,
        recurrent_dropout=0.0,
        zoneout_cell=0.0,
        zoneout_hidden=0.0,
        weight_drop=0.0,
    ):
        _check_devices(
            input, hx=hx, cx=cx, reset=reset, **{f"params[{k}]": p for k, p in enumerate(params)}
        )
        D = 2 if bidirectional else 1
        return (
            input.new_empty(*input.shape[:-1], D * hx.shape[-1]),
            hx.new_empty(hx.shape),
            cx.new_empty(cx.shape),
        )


def register_python_autograd(namespace: str) -> None:
    """The autograd of the kernel ops of ``namespace`` in Python: without the extension, that of
    the fused_lstm ops, which csrc/autograd/kernel_ops.cpp has otherwise. The forward ops'
    backward is the backward op, the handwritten one, and the workspace outputs (gates, cells)
    get no gradient. tests/test_ops.py holds the two equal, registering this one on a namespace
    of its own over the native kernels."""
    ops = getattr(torch.ops, namespace)

    def setup_layer(ctx, inputs, output):
        (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, _, w_hr, reverse, *extras) = inputs
        y, _, _, gates, cells = output
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, w_hr, y, gates, cells, *extras)
        ctx.batch_sizes, ctx.reverse, ctx.biased = batch_sizes, reverse, b_ih is not None

    def layer_backward(ctx, grad_y, grad_h, grad_c, _gates, _cells):
        input, h0, c0, w_ih, w_hh, w_hr, y, gates, cells, *extras = ctx.saved_tensors
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = ops.layer_backward(
            grad_y,
            grad_h,
            grad_c,
            input,
            ctx.batch_sizes,
            h0,
            c0,
            w_ih,
            w_hh,
            w_hr,
            y,
            gates,
            cells,
            ctx.reverse,
            *extras,
        )
        db = db if ctx.biased else None
        # reverse, the regularisers and the resets are constants.
        return (
            dx,
            None,
            dh0,
            dc0,
            dw_ih,
            dw_hh,
            db,
            db,
            dw_hr if w_hr is not None else None,
            None,
            *(None for _ in extras),
        )

    def setup_cell(ctx, inputs, output):
        input, h0, c0, w_ih, w_hh, b_ih, _ = inputs
        _, _, gates, cells = output
        ctx.save_for_backward(input, h0, c0, w_ih, w_hh, gates, cells)
        ctx.biased = b_ih is not None

    def cell_backward(ctx, grad_h, grad_c, _gates, _cells):
        dx, dh0, dc0, dw_ih, dw_hh, db = ops.cell_backward(grad_h, grad_c, *ctx.saved_tensors)
        db = db if ctx.biased else None
        return dx, dh0, dc0, dw_ih, dw_hh, db, db

    def refuse(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)

    torch.library.register_autograd(
        f"{namespace}::layer_forward", layer_backward, setup_context=setup_layer
    )
    torch.library.register_autograd(
        f"{namespace}::cell_forward", cell_backward, setup_context=setup_cell
    )
    # The handwritten backwards are not differentiable: a second backward raises, as with the
    # extension, rather than treating them as constants.
    for name in ("layer_backward", "cell_backward"):
        torch.library.register_autograd(
            f"{namespace}::{name}", refuse, setup_context=lambda ctx, inputs, output: None
        )

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

from pathlib import Path
from types import SimpleNamespace

import torch
from torch import Tensor

from . import reference

KERNEL_OPS = ("layer_forward", "layer_backward", "cell_forward", "cell_backward")

SCHEMA_FILE = Path(__file__).with_name("op_schemas.inc")


def _read_schemas() -> tuple[list[str], dict[str, tuple[torch.Tag, ...]]]:
    """The schemas of op_schemas.inc, the native library's too (csrc/schemas.cpp): the lines
    between its raw-string markers, but the comments and blanks, each less its " @tag"s."""
    text = SCHEMA_FILE.read_text()
    body = text[text.index('R"schemas(') + len('R"schemas(') : text.rindex(')schemas"')]
    schemas, tags = [], {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        schema, *names = line.split(" @")
        schemas.append(schema)
        tags[_name(schema)] = tuple(getattr(torch.Tag, n) for n in names)
    return schemas, tags


def _name(schema: str) -> str:
    return schema[: schema.index("(")]


SCHEMAS, TAGS = _read_schemas()

# The error of a second backward through the handwritten backwards; the extension raises its own
# copy (csrc/autograd/kernel_ops.cpp), which the tests hold equal to this one.
DOUBLE_BACKWARD_ERROR = (
    "fused_lstm: double backward is not supported (differentiating gradients that were computed "
    "with create_graph=True through FusedLSTM, FusedLSTMCell, fused_lstm::lstm, "
    "fused_lstm::layer_forward or fused_lstm::cell_forward)"
)

_LIBRARIES: dict[str, torch.library.Library] = {}  # held for the process: the ops live as long


def define(namespace: str = "fused_lstm", names: tuple[str, ...] | None = None) -> None:
    """Defines the ops of SCHEMAS (those in ``names``, else all) in ``namespace``, once: the
    fused_lstm ops, and the CUDA emulator's copies of the kernel ops (fused_lstm.testing)."""
    if namespace in _LIBRARIES:
        return
    lib = _LIBRARIES[namespace] = torch.library.Library(namespace, "DEF")  # noqa: TOR901
    for schema in SCHEMAS:
        if names is None or _name(schema) in names:
            lib.define(schema, tags=TAGS.get(_name(schema), ()))


def _fake(name: str):
    """Registers the decorated function as the fake kernel of fused_lstm::``name``. It gets the
    call's arguments by name (defaults filled in) as one object, so that no fake lists them: an
    argument added to a schema changes nothing here. The tensors of an op with an ``input`` must
    be on its device: the dispatcher sends a call whose tensors mix the meta device with a real
    one to the fake kernel, rather than to a device kernel whose checks would refuse it."""

    def register_it(shapes):
        arguments = getattr(torch.ops.fused_lstm, name).default._schema.arguments
        defaults = {a.name: a.default_value for a in arguments if a.has_default_value()}

        def fake(*args, **kwargs):
            call = {**defaults, **dict(zip((a.name for a in arguments), args)), **kwargs}
            if "input" in call:
                _check_devices(call)
            return shapes(SimpleNamespace(**call))

        torch.library.register_fake(f"fused_lstm::{name}")(fake)
        return shapes

    return register_it


def _check_devices(call: dict) -> None:
    """What the native ops check: every tensor on input's device, but batch_sizes, which is a
    CPU tensor wherever the input is (PackedSequence's, as nn.LSTM takes it)."""
    device = call["input"].device
    for name, value in call.items():
        if name == "batch_sizes":
            continue
        tensors = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for k, t in tensors:
            if isinstance(t, Tensor) and t.device != device:
                where = name if k is None else f"{name}[{k}]"
                raise RuntimeError(
                    f"fused_lstm: {where} must be on the device of input ({device}), got {t.device}"
                )


def register(native: bool) -> None:
    """Fakes and reference kernels; ``native``: whether the native library registered its
    kernels."""

    @_fake("keep_mask")
    def _(a):
        return a.like.new_empty(a.size)

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

    @_fake("layer_forward")
    def _(a):
        H, Hr = a.w_hh.shape[0] // 4, a.w_hh.shape[1]
        lead = a.input.shape[:-1]
        return (
            a.input.new_empty(*lead, Hr),
            a.h0.new_empty(a.h0.shape),
            a.c0.new_empty(a.c0.shape),
            a.input.new_empty(*lead, 4 * H),
            a.input.new_empty(*lead, H),
        )

    # The gradients of input, h0, c0, w_ih, w_hh and the bias: a cell's, and a layer's before
    # the projection's.
    @_fake("cell_backward")
    def cell_grads(a):
        return (
            a.input.new_empty(a.input.shape),
            a.h0.new_empty(a.h0.shape),
            a.c0.new_empty(a.c0.shape),
            a.w_ih.new_empty(a.w_ih.shape),
            a.w_hh.new_empty(a.w_hh.shape),
            a.w_hh.new_empty(a.w_hh.shape[0]),
        )

    @_fake("layer_backward")
    def _(a):
        grad_w_hr = a.w_hr.new_empty(a.w_hr.shape) if a.w_hr is not None else a.input.new_empty(0)
        return (*cell_grads(a), grad_w_hr)

    @_fake("cell_forward")
    def _(a):
        return (
            a.h0.new_empty(a.h0.shape),
            a.c0.new_empty(a.c0.shape),
            a.input.new_empty(a.input.shape[0], a.w_hh.shape[0]),
            a.c0.new_empty(a.c0.shape),
        )

    if not native:
        return

    @_fake("lstm")
    def _(a):
        D = 2 if a.bidirectional else 1
        return (
            a.input.new_empty(*a.input.shape[:-1], D * a.hx.shape[-1]),
            a.hx.new_empty(a.hx.shape),
            a.cx.new_empty(a.cx.shape),
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

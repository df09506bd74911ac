"""Test helpers: run the CUDA backend on the CPU under the CUDA emulator.

``fused_lstm._emulated_cuda`` is ``csrc/cuda/lstm_cuda.cu`` compiled by the host compiler
against ``csrc/emulator``, built at install where ``FUSED_LSTM_BUILD_EMULATOR=1`` is set (it
needs no CUDA toolkit). It registers those kernels for the CPU key of the kernel ops of the
namespace ``fused_lstm_emulated``, defined here from the ops' own schemas.
Inside :func:`emulated_cuda`, the four kernel ops on CPU tensors run those kernels instead of the
CPU ones; autograd and every other op are unchanged.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
import torch.utils.deterministic as _fill

from . import _backend  # noqa: F401  (loads fused_lstm._C, which declares the ops)
from . import _library
from ._library import KERNEL_OPS
from ._redirect import redirect

ORDERS = ("forward", "reverse", "shuffle")
EMULATED_NAMESPACE = "fused_lstm_emulated"


EMULATOR_MISSING = (
    "fused_lstm.testing.emulated_cuda() needs the CUDA emulator, fused_lstm._emulated_cuda, "
    "which is built only where the install asks for it: reinstall with "
    "`FUSED_LSTM_BUILD_EMULATOR=1 pip install --no-build-isolation -e .`"
)


def emulator_built() -> bool:
    return importlib.util.find_spec("fused_lstm._emulated_cuda") is not None


def _emulator():
    if not emulator_built():
        raise RuntimeError(EMULATOR_MISSING)
    _library.define(EMULATED_NAMESPACE, KERNEL_OPS)
    from . import _emulated_cuda

    return _emulated_cuda


class EmulatorRun:
    """What ran under one :func:`emulated_cuda` block: ``launches`` (kernel launches) and
    ``threads`` (CUDA threads executed), read at any time during or after the block."""

    def __init__(self):
        self._start = _emulator().counters()
        self._end = None

    def _now(self):
        return self._end or _emulator().counters()

    @property
    def launches(self) -> int:
        return self._now()[0] - self._start[0]

    @property
    def threads(self) -> int:
        return self._now()[1] - self._start[1]


def _on_cpu(args) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    return bool(tensors) and all(t.device.type == "cpu" for t in tensors)


@contextlib.contextmanager
def emulated_cuda(order: str = "forward", seed: int = 0) -> Iterator[EmulatorRun]:
    """Inside the block, ``fused_lstm::layer_forward``, ``layer_backward``, ``cell_forward`` and
    ``cell_backward`` on CPU tensors run the CUDA kernels under the emulator. ``order`` (one of
    :data:`ORDERS`) is the order of each launch's blocks and of a block's runnable threads
    between synchronisation points; ``"shuffle"`` draws it from ``seed``. Yields an
    :class:`EmulatorRun`. Not thread-safe: the emulator's order and torch's deterministic-fill
    setting it switches on are process-wide."""
    emu = _emulator()
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    emu.set_order(order, seed)
    run = EmulatorRun()
    emulated = getattr(torch.ops, EMULATED_NAMESPACE)
    table = {f"fused_lstm::{name}": getattr(emulated, name) for name in KERNEL_OPS}
    # Fresh tensors (torch.empty, the kernels' output buffers) start NaN, as shared memory does,
    # so an element a kernel fails to write shows up instead of reading as stale memory.
    saved = torch.are_deterministic_algorithms_enabled(), _fill.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    _fill.fill_uninitialized_memory = True
    try:
        with redirect(table, _on_cpu):
            yield run
    finally:
        run._end = emu.counters()
        emu.set_order("forward", 0)
        torch.use_deterministic_algorithms(saved[0])
        _fill.fill_uninitialized_memory = saved[1]

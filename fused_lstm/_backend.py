"""Which devices have native kernels in this install.

The extension ``fused_lstm._C`` registers the ops ``torch.ops.fused_lstm.*`` with the dispatcher
when it is imported; the dispatcher, not Python, then knows which device types have a kernel.
Without the extension (a source tree that was never built) everything runs on the reference.
"""

from __future__ import annotations

import contextlib

import torch

try:
    from . import _C  # noqa: F401  (importing it registers the ops)
except ImportError as exc:  # pragma: no cover - exercised only on installs without a build
    _C = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None
    from . import _library

    _library.register()

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


# The modules run all of these on a native device: the layer ops for FusedLSTM, the cell ops for
# FusedLSTMCell.
_OPS = ("fused_lstm::layer_forward", "fused_lstm::layer_backward", "fused_lstm::cell_forward",
       "fused_lstm::cell_backward")

# Asked once, at import: the registrations do not change afterwards, and torch.compile cannot
# trace the dispatcher query (it returns a bool, not a tensor), only read this set.
_COMPILED = frozenset(
    device for device, key in _DISPATCH_KEYS.items()
    if _C is not None and all(torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
                              for op in _OPS))


_reference_only = False


def has_native(device_type: str) -> bool:
    if _reference_only:
        return False
    return device_type in _COMPILED and (device_type != "cuda" or torch.cuda.is_available())


@contextlib.contextmanager
def reference_only():
    """Run every layer on the pure-PyTorch reference inside this block (for tests and for
    benchmarking the reference against the native kernels). Not thread-safe."""
    global _reference_only
    saved, _reference_only = _reference_only, True
    try:
        yield
    finally:
        _reference_only = saved


def native_backends() -> set[str]:
    """The device types (``"cpu"``, ``"cuda"``) that have native kernels in this install and can
    run them here: ``"cuda"`` needs both the compiled CUDA kernels and a visible GPU."""
    return {d for d in _DISPATCH_KEYS if has_native(d)}

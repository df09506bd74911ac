"""The ops, and which devices have native kernels for them in this install.

The extension ``fused_lstm._C`` declares the ops ``torch.ops.fused_lstm.*`` and registers their
native kernels and autograd with the dispatcher when it is imported; :mod:`fused_lstm._library`
adds the fake kernels and the reference as the kernel of every other device. The dispatcher, not
Python, then picks the implementation by device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import _library, _redirect, reference

try:
    from . import _C  # importing it registers the ops
except ImportError as exc:
    raise ImportError(
        "fused_lstm: the compiled extension fused_lstm._C is missing or does not load "
        f"({exc}); it declares the ops everything runs on. Build it from the source tree with "
        "`pip install --no-build-isolation -e .` (a C++ compiler and torch are needed).") from exc

# The CPU kernels' ISA is chosen once, here: a FUSED_LSTM_CPU_ISA that names none this CPU runs
# raises (ValueError, naming the variable) at import rather than at the first kernel call.
_C.cpu_isa()

_library.register()

_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# Asked once, at import: the registrations do not change afterwards.
_COMPILED = frozenset(
    device for device, key in _DISPATCH_KEYS.items()
    if all(torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", key)
           for op in _library.KERNEL_OPS))


def native_backends() -> set[str]:
    """The device types (``"cpu"``, ``"cuda"``) that have native kernels in this install and can
    run them here: ``"cuda"`` needs both the compiled CUDA kernels and a visible GPU. Other
    devices run the reference."""
    return {d for d in _COMPILED if d != "cuda" or torch.cuda.is_available()}


@contextlib.contextmanager
def reference_only() -> Iterator[None]:
    """Inside this block, every call of the four kernel ops runs the pure-PyTorch reference
    instead of the native kernel (for tests, and for benchmarking the reference against the
    native kernels); autograd, the ops' calls and what torch.compile puts in its graphs stay
    those of a native run. It holds for the calling thread only."""
    # Looked up on entry, so that a test may wrap a reference function.
    table = {f"fused_lstm::{name}": getattr(reference, name) for name in _library.KERNEL_OPS}
    with _redirect.redirect(table, applies=lambda args: True):
        yield

"""The ops, and which devices have native kernels for them in this install.

The native library ``fused_lstm/libfused_lstm.so``, where it is built, defines the ops
``torch.ops.fused_lstm.*`` (from :data:`_library.SCHEMA_FILE`) and registers their native kernels
and autograd with the dispatcher when it is loaded, which importing ``fused_lstm._C``, the Python
module linked against it, does. Without it, :mod:`fused_lstm._library` defines the same ops from the same file.
Then the fake kernels and the reference as the kernel of every other device are added. The
dispatcher, not Python, picks the implementation by device.

Without the extension (an install with ``FUSED_LSTM_NO_EXTENSION=1``, or where no C++ compiler
was found), every op runs the pure-PyTorch reference, and the modules warn once that the
native kernels are missing. ``FUSED_LSTM_NO_EXTENSION=1`` at import also leaves a built
extension unloaded, which is how the tests run an install without one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from . import _library, _redirect, reference

# The native library, which C++ programs link too (docs/deploying.md).
LIBRARY = Path(__file__).with_name("libfused_lstm.so")
# Where CMake's find_package(FusedLSTM) finds the library's package configuration.
CMAKE_PREFIX_PATH = str(Path(__file__).with_name("share") / "cmake")


def _load_extension() -> bool:
    if os.environ.get("FUSED_LSTM_NO_EXTENSION", "0") == "1":
        return False
    if importlib.util.find_spec("fused_lstm._C") is None:
        return False
    try:
        from . import _C  # loads the library, which it is linked against
    except (ImportError, OSError) as exc:
        # Built, but not loadable here (another torch, a missing library): a broken install,
        # not a pure-PyTorch one.
        raise ImportError(
            f"fused_lstm: the native library {LIBRARY.name} or fused_lstm._C does not load ({exc}). "
            "Rebuild them "
            "against the torch installed here with `pip install --no-build-isolation -e .`, or "
            "install without it: `FUSED_LSTM_NO_EXTENSION=1 pip install .`"
        ) from exc
    # The CPU kernels' ISA is chosen once, here: a FUSED_LSTM_CPU_ISA that names none this CPU
    # runs raises (ValueError, naming the variable) at import rather than at the first kernel
    # call.
    _C.cpu_isa()
    return True


EXTENSION = _load_extension()
if not EXTENSION:
    _library.define()
_library.register(native=EXTENSION)

MISSING_KERNELS = (
    "fused_lstm: this install has no native kernels (fused_lstm._C was not built), so FusedLSTM "
    "and FusedLSTMCell run the pure-PyTorch reference, which is much slower. With a C++ "
    "compiler, reinstall: `pip install --no-build-isolation -e .`"
)
_warned = False


def warn_if_no_extension() -> None:
    """Warns, once per process, where the native kernels are missing."""
    global _warned
    if not EXTENSION and not _warned:
        _warned = True
        warnings.warn(MISSING_KERNELS, stacklevel=3)


_DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}

# Asked once, at import: the registrations do not change afterwards.
_COMPILED = frozenset(
    device
    for device, key in _DISPATCH_KEYS.items()
    if EXTENSION
    and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_lstm::{op}", key)
        for op in _library.KERNEL_OPS
    )
)


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

"""Run some ``fused_lstm`` ops on other implementations inside a block, below autograd.

The modules and the ops' autograd always call the dispatcher ops (``torch.ops.fused_lstm.*``).
To run those calls on something else (the pure-PyTorch reference, or the CUDA kernels under the
emulator), a TorchDispatchMode sees each op after autograd has recorded it and hands the chosen
ones to the replacement, which has the op's signature. Autograd, the saved workspace and the
backward op calls are then exactly those of a native run; only the kernels differ.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

from torch.utils._python_dispatch import TorchDispatchMode


class _Redirect(TorchDispatchMode):
    def __init__(self, table: Mapping[str, Callable], applies: Callable[[tuple], bool]):
        super().__init__()
        self.table, self.applies = table, applies

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # torch.compile then compiles inside the block (rather than running it eagerly) with the
        # mode off, and the compiled code's op calls come here at run time like eager ones.
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        impl = self.table.get(func._schema.name)
        # The mode is off while this runs, so the replacement's own ops go their usual way.
        if impl is not None and self.applies(args):
            return impl(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def redirect(table: Mapping[str, Callable], applies: Callable[[tuple], bool]) -> Iterator[None]:
    """Inside the block, a call of op ``name`` (``"fused_lstm::layer_forward"``, ...) in
    ``table`` whose arguments satisfy ``applies`` runs ``table[name]`` instead."""
    with _Redirect(table, applies):
        yield

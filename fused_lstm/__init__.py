"""fused_lstm: drop-in replacements for torch.nn.LSTM / nn.LSTMCell on fused kernels.

Each layer and cell step runs the ``torch.ops.fused_lstm`` ops (native C++ on the CPU, CUDA on
the GPU) with a handwritten backward, or the pure-PyTorch reference in :mod:`fused_lstm.reference`
on devices this install has no kernel for.
"""

from ._backend import native_backends, reference_only
from .function import LSTMCellFunction, LSTMLayerFunction
from .modules import FusedLSTM, FusedLSTMCell
from .trace import gate_trace

__all__ = ["FusedLSTM", "FusedLSTMCell", "LSTMCellFunction", "LSTMLayerFunction", "gate_trace",
           "native_backends", "reference_only"]
__version__ = "0.1.0"

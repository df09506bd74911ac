"""fused_lstm: drop-in replacements for torch.nn.LSTM / nn.LSTMCell on fused kernels.

FusedLSTM calls the op ``torch.ops.fused_lstm.lstm`` and FusedLSTMCell ``cell_forward``; their
autograd (C++) runs the handwritten backward. The kernels are native C++ on the CPU and CUDA on
the GPU, and the pure-PyTorch reference in :mod:`fused_lstm.reference` on any other device.
"""

from ._backend import CMAKE_PREFIX_PATH as cmake_prefix_path
from ._backend import native_backends, reference_only
from .modules import FusedLSTM, FusedLSTMCell
from .trace import gate_trace

__all__ = [
    "FusedLSTM",
    "FusedLSTMCell",
    "cmake_prefix_path",
    "gate_trace",
    "native_backends",
    "reference_only",
]
__version__ = "0.1.0"

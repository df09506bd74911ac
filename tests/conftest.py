# One file per thing under test (listed below), never one per backend: see the backend fixture.
"""The test files, by what they test:

  test_parity            FusedLSTM / FusedLSTMCell values and gradients against nn.LSTM(Cell)
  test_edge_inputs       unusual inputs: strides, batch size 0, NaN and Inf, very long sequences
  test_errors            bad arguments raise nn.LSTM's errors
  test_module            the rest of the modules' surface: parameters, construction, dispatch
  test_gradcheck         torch.autograd.gradcheck of the modules and ops; double backward
  test_threads_and_memory  concurrent Python threads, intra-op thread counts, memory growth
  test_ops               the dispatcher ops themselves (opcheck, against the reference)
  test_cpu_kernels       the CPU kernels' size thresholds, tiles and panels
  test_isa               the CPU kernels' ISA variants, each forced (FUSED_LSTM_CPU_ISA) in a
                         process
  test_cuda_kernels      what only the CUDA kernels have: tiles, streams, autocast, registration
  test_emulator          the CUDA emulator itself
  test_regularisers      recurrent dropout, zoneout, weight drop and reset
  test_trace             gate_trace
  test_compile, test_torchscript, test_export   the modules under those tools
  test_examples, test_benchmarks                examples/ and benchmarks/

A test that runs per backend takes the `backend` fixture (a Backend: .name, .device, .ops,
.context) and runs on every backend in BACKENDS; @pytest.mark.backends("reference", "cpu")
restricts it to those.
"""

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import pytest
import torch

import fused_lstm
from fused_lstm.testing import emulated_cuda
from helpers import needs_cuda, needs_emulator

# reference: the pure-PyTorch oracle and fallback, under fused_lstm.reference_only();
# cpu: the native C++ kernels; emulated_cuda: the CUDA kernels run by the CUDA emulator on CPU
# tensors; cuda: the CUDA kernels on a GPU.
BACKENDS = ("reference", "cpu", "emulated_cuda", "cuda")

_SKIPS = {
    "cpu": pytest.mark.skipif(
        "cpu" not in fused_lstm.native_backends(), reason="needs the CPU kernels"
    ),
    "emulated_cuda": needs_emulator,
    "cuda": needs_cuda,
}


@dataclass(frozen=True)
class Backend:
    """What a test running on one backend needs."""

    name: str  # one of BACKENDS
    device: str  # where the test puts its tensors: "cpu", or "cuda" for the cuda backend
    ops: Any  # the kernel ops' namespace: fused_lstm.reference, else torch.ops.fused_lstm
    # Makes the ops run on this backend. The fixture holds it for the test; a thread the test
    # starts enters it again (reference_only holds for the thread that enters it).
    context: Callable[[], ContextManager]

    def __str__(self):
        return self.name


def _backend(name):
    return Backend(
        name=name,
        device="cuda" if name == "cuda" else "cpu",
        ops=fused_lstm.reference if name == "reference" else torch.ops.fused_lstm,
        context={"reference": fused_lstm.reference_only, "emulated_cuda": emulated_cuda}.get(
            name, contextlib.nullcontext
        ),
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "backends(*names): run the test only on these backends")
    config.addinivalue_line(
        "markers",
        "no_launch: the emulated CUDA kernels launch nothing here "
        "(no rows): the backend fixture does not require a launch",
    )


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    names = marker.args if marker else BACKENDS
    assert names and set(names) <= set(BACKENDS), f"unknown backends {names}"
    metafunc.parametrize(
        "backend", [pytest.param(n, id=n, marks=_SKIPS.get(n, ())) for n in names], indirect=True
    )


@pytest.fixture
def backend(request):
    b = _backend(request.param)
    with b.context() as run:
        yield b
    # Under the emulator the CUDA kernels must have run: a test that silently ran the CPU
    # kernels or the reference would prove nothing.
    if b.name == "emulated_cuda" and request.node.get_closest_marker("no_launch") is None:
        assert run.launches > 0 and run.threads > 0, "the emulated CUDA kernels did not run"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    """cuDNN may run float32 RNNs in TF32 (allow_tf32 defaults to True), which would put ~1e-3
    errors into the float32 baselines on a GPU."""
    if not torch.cuda.is_available():
        yield
        return
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

import contextlib

import pytest
import torch

import fused_lstm

# Every parity test runs once per backend this install has on the CPU: the native C++ kernel
# (when built) and the pure-PyTorch reference that is the oracle and the fallback.
BACKENDS = ["reference"] + (["native"] if "cpu" in fused_lstm.native_backends() else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    ctx = fused_lstm.reference_only() if request.param == "reference" else contextlib.nullcontext()
    with ctx:
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

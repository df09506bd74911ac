"""torch.compile(fullgraph=True) of FusedLSTM / FusedLSTMCell and of a model containing them:
same values and gradients as eager mode and nn.LSTM, the fused ops in the compiled graphs
(fullgraph=True already rules out a graph break), no recompile per sequence length.

nn.LSTM itself cannot be compiled with fullgraph=True (Dynamo refuses RNN modules)."""

import contextlib

import pytest
import torch
from functorch.compile import make_boxed_func
from torch import nn
from torch._dynamo.backends.common import aot_autograd
from torch._inductor.utils import run_and_get_code
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm import FusedLSTM, FusedLSTMCell, reference
from helpers import assert_same, cell_outputs_and_grads, outputs_and_grads

F64 = torch.float64
FORWARD_OP, BACKWARD_OP = "fused_lstm.layer_forward", "fused_lstm.layer_backward"
CELL_FORWARD_OP, CELL_BACKWARD_OP = "fused_lstm.cell_forward", "fused_lstm.cell_backward"


class RecordingBackend:
    """aot_eager that counts Dynamo's compiles and keeps the code of the forward and backward
    graphs AOTAutograd hands to the compiler."""

    def __init__(self):
        self.compiles, self.forward_code, self.backward_code = 0, [], []

    def __call__(self, gm, example_inputs):
        self.compiles += 1

        def keeping(codes):
            def compiler(graph, _inputs):
                codes.append(graph.code)
                return make_boxed_func(graph.forward)

            return compiler

        return aot_autograd(
            fw_compiler=keeping(self.forward_code), bw_compiler=keeping(self.backward_code)
        )(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# input shape and batch size (None: unbatched) of each input form; packed: padded, then packed
FORMS = {
    "time_major": ((5, 2, 3), 2),
    "batch_first": ((2, 5, 3), 2),
    "unbatched": ((5, 3), None),
    "packed": ((5, 3, 3), 3),
}


@pytest.mark.backends("cpu", "cuda")
@pytest.mark.parametrize("form", FORMS)
def test_compiled_lstm_matches_eager_and_nn_lstm(backend, form):
    device = backend.device
    shape, batch = FORMS[form]
    ref = nn.LSTM(
        3,
        4,
        num_layers=2,
        bidirectional=True,
        proj_size=2,
        batch_first=form == "batch_first",
        dtype=F64,
        device=device,
    )
    fused = FusedLSTM.from_lstm(ref)
    recorder = RecordingBackend()
    compiled = torch.compile(fused, fullgraph=True, backend=recorder)
    like = dict(dtype=F64, device=device, requires_grad=True)
    x = torch.randn(*shape, **like)
    lead = (4,) if batch is None else (4, batch)
    hx = (torch.randn(*lead, 2, **like), torch.randn(*lead, 4, **like))

    def run(module):
        inp = x
        if form == "packed":  # unsorted lengths: the permutations of hx and h_n are compiled too
            inp = pack_padded_sequence(x, torch.tensor([3, 5, 2]), enforce_sorted=False)
        return outputs_and_grads(module, inp, hx, [x, *hx])

    want, got = run(ref), run(compiled)
    assert_same(want, got, atol=1e-9)
    assert_same(run(fused), got, atol=1e-12)
    assert recorder.compiles == 1
    assert FORWARD_OP in recorder.forward_code[0] and BACKWARD_OP in recorder.backward_code[0]


@pytest.mark.backends("cpu", "cuda")
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_cell_matches_nn_lstm_cell(backend, bias):
    device = backend.device
    ref = nn.LSTMCell(3, 4, bias=bias, dtype=F64, device=device)
    recorder = RecordingBackend()
    compiled = torch.compile(FusedLSTMCell.from_lstm_cell(ref), fullgraph=True, backend=recorder)
    like = dict(dtype=F64, device=device, requires_grad=True)
    x, hx = torch.randn(2, 3, **like), (torch.randn(2, 4, **like), torch.randn(2, 4, **like))
    assert_same(
        cell_outputs_and_grads(ref, x, hx, [x, *hx]),
        cell_outputs_and_grads(compiled, x, hx, [x, *hx]),
        atol=1e-9,
    )
    assert CELL_FORWARD_OP in recorder.forward_code[0]
    assert CELL_BACKWARD_OP in recorder.backward_code[0]
    assert FORWARD_OP not in recorder.forward_code[0] + recorder.backward_code[0]


def counting(monkeypatch, name):
    """Counts the calls of the reference's function ``name`` from here on."""
    calls = []
    real = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("use_reference", [False, True])
@pytest.mark.parametrize("shared", ["hx=None", "one tensor twice"])
def test_compiled_cell_with_one_tensor_for_both_states(monkeypatch, use_reference, shared):
    """Without hx FusedLSTMCell uses one zeros tensor for h_0 and c_0, as nn.LSTMCell does, and a
    caller may pass one tensor twice: both compile, on the native ops and on the reference."""
    ref = nn.LSTMCell(3, 4, dtype=F64)
    fused = FusedLSTMCell.from_lstm_cell(ref)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    state = torch.randn(2, 4, dtype=F64, requires_grad=True)
    hx, leaves = (None, [x]) if shared == "hx=None" else ((state, state), [x, state])
    want = cell_outputs_and_grads(ref, x, hx, leaves)
    backend = RecordingBackend()
    calls = counting(monkeypatch, "cell_forward")
    with fused_lstm.reference_only() if use_reference else contextlib.nullcontext():
        got = cell_outputs_and_grads(
            torch.compile(fused, fullgraph=True, backend=backend), x, hx, leaves
        )
    assert_same(want, got, atol=1e-9)
    assert CELL_FORWARD_OP in backend.forward_code[0]
    assert bool(calls) == use_reference


def test_no_recompile_per_batch_size():
    """The lstm op's C++ checks read sizes as SymInts: one dynamic graph serves every batch
    size and length (a C++ size() would specialise the batch size, one compile per size)."""
    fused = FusedLSTM(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    backend = RecordingBackend()
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    for T, B in ((5, 2), (7, 3), (4, 5), (9, 4)):
        x = torch.randn(T, B, 3, dtype=F64, requires_grad=True)
        assert_same(
            outputs_and_grads(fused, x, None, [x]),
            outputs_and_grads(compiled, x, None, [x]),
            atol=0,
        )
    assert backend.compiles == 2  # static shapes first, then one graph dynamic in T and B


def test_compiled_reference_backend_matches_native(monkeypatch):
    """Under reference_only the compiled graphs are the native run's (the kernel ops), and
    their calls run the reference."""
    fused = FusedLSTM(3, 4, bidirectional=True, dtype=F64)
    x = torch.randn(3, 2, 3, dtype=F64, requires_grad=True)
    want = outputs_and_grads(fused, x, None, [x])
    backend = RecordingBackend()
    forward_calls, backward_calls = (
        counting(monkeypatch, name) for name in ("layer_forward", "layer_backward")
    )
    with fused_lstm.reference_only():
        got = outputs_and_grads(torch.compile(fused, fullgraph=True, backend=backend), x, None, [x])
    assert_same(want, got, atol=1e-12)
    assert FORWARD_OP in backend.forward_code[0] and BACKWARD_OP in backend.backward_code[0]
    assert len(forward_calls) == len(backward_calls) == 2  # one per direction


class Tagger(nn.Module):
    """A model that contains a FusedLSTM among other layers."""

    def __init__(self, device):
        super().__init__()
        factory = dict(dtype=F64, device=device)
        self.embed = nn.Linear(3, 5, **factory)
        self.lstm = FusedLSTM(
            5, 6, num_layers=2, bidirectional=True, proj_size=4, batch_first=True, **factory
        )
        self.head = nn.Linear(8, 2, **factory)

    def forward(self, x):
        out, (h, c) = self.lstm(self.embed(x).tanh())
        return self.head(out), h, c


@pytest.mark.backends("cpu", "cuda")
def test_model_compiles_with_inductor(backend):
    """The default backend (inductor), fullgraph: the generated code calls the fused ops, and a
    training step gives eager mode's loss and gradients."""
    device = backend.device
    model = Tagger(device)
    x = torch.randn(2, 6, 3, dtype=F64, device=device, requires_grad=True)

    def step(module):
        y, h, c = module(x)
        loss = y.square().mean() + h.sum() + c.sin().sum()
        return [loss, *torch.autograd.grad(loss, [x, *model.parameters()])]

    got, code = run_and_get_code(step, torch.compile(model, fullgraph=True))
    assert_same(step(model), got, atol=1e-12)
    code = "\n".join(code)
    assert FORWARD_OP in code and BACKWARD_OP in code


def test_double_backward_under_compile_is_an_error():
    fused = FusedLSTM(3, 4, dtype=F64)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    out, _ = torch.compile(fused, fullgraph=True, backend=RecordingBackend())(x)
    (g,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(g.square().sum(), x)


def test_packed_hx_batch_mismatch_fails_at_run_time():
    """batch_sizes[0] is data to the compiler: the hx size check runs in the compiled code."""
    fused = FusedLSTM(3, 4, dtype=F64)
    packed = pack_padded_sequence(torch.randn(5, 3, 3, dtype=F64), torch.tensor([5, 3, 2]))
    hx = (torch.zeros(1, 2, 4, dtype=F64), torch.zeros(1, 2, 4, dtype=F64))
    with pytest.raises(RuntimeError, match="Runtime assertion failed"):
        torch.compile(fused, fullgraph=True, backend=RecordingBackend())(packed, hx)

"""TorchScript: torch.jit.script and torch.jit.trace of modules holding FusedLSTM / FusedLSTMCell
(the containers people script), against eager FusedLSTM and nn.LSTM in float64: outputs and
gradients, a training step, torch.jit.save / load (also in a fresh process), and nn.LSTM's
errors from the scripted form."""

import copy
import io
import subprocess
import sys
from typing import List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from fused_lstm import FusedLSTM, FusedLSTMCell
from helpers import assert_same, cell_outputs_and_grads, needs_extension, outputs_and_grads

F64 = torch.float64
TIGHT = {"atol": 1e-12, "rtol": 1e-12}
pytestmark = pytest.mark.filterwarnings(
    "ignore::FutureWarning",  # jit is deprecated
    "ignore::torch.jit.TracerWarning",
)


class Holder(nn.Module):
    """A module holding an LSTM, as a model calls it: input and optional state in, all out."""

    def __init__(self, lstm: nn.Module):
        super().__init__()
        self.lstm = lstm

    def forward(
        self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        return self.lstm(x, hx)


class PackedHolder(Holder):
    """For a PackedSequence: its output's data, which must be in the input's packed order (a
    scripted module returns its own NamedTuple type for a PackedSequence, as nn.LSTM's does)."""

    def forward(
        self, x: PackedSequence, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        out, state = self.lstm(x, hx)
        assert torch.equal(out.batch_sizes, x.batch_sizes)
        return out.data, state


class Stack(nn.Module):
    """LSTMs in an nn.ModuleList, each fed the last one's output; the states of all returned."""

    def __init__(self, lstms: List[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(lstms)

    def forward(
        self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        hs: List[Tensor] = []
        cs: List[Tensor] = []
        for layer in self.layers:
            x, (h, c) = layer(x, hx)
            hs.append(h)
            cs.append(c)
        return x, (torch.cat(hs), torch.cat(cs))


class WordModel(nn.Module):
    """pytorch/examples' word language model: tokens and the hidden state in, scores and the
    next hidden state out."""

    def __init__(self, lstm: nn.Module, vocab: int = 11):
        super().__init__()
        self.embed = nn.Embedding(vocab, lstm.input_size)
        self.lstm = lstm
        self.decode = nn.Linear(lstm.hidden_size, vocab)

    def forward(
        self, tokens: Tensor, hidden: Tuple[Tensor, Tensor]
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        out, hidden = self.lstm(self.embed(tokens), hidden)
        return self.decode(out), hidden


class CellLoop(nn.Module):
    """A cell stepped over the time steps of a (T, B, I) input, as hand-written decoders do."""

    def __init__(self, cell: nn.Module):
        super().__init__()
        self.cell = cell

    def forward(
        self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        outputs: List[Tensor] = []
        for step in x.unbind(0):
            hx = self.cell(step, hx)
            outputs.append(hx[0])
        assert hx is not None
        return torch.stack(outputs), hx


def fused_and_nn(config, layers=1):
    """A float64 FusedLSTM built from an nn.LSTM (``layers`` of each, for Stack), both as lists."""
    torch.manual_seed(0)
    lstms = [nn.LSTM(**config, dtype=F64) for _ in range(layers)]
    return [FusedLSTM.from_lstm(m) for m in lstms], lstms


def saved_and_loaded(scripted):
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    return torch.jit.load(buf)


class NoneState(nn.Module):
    """A module traced without a state, called as the others are: (x, None)."""

    def __init__(self, traced):
        super().__init__()
        self.traced = traced

    def forward(self, x, hx=None):
        assert hx is None
        return self.traced(x)


def compiled_forms(model, example):
    """The TorchScript forms of ``model`` to check: scripted, scripted then saved and loaded,
    and (for a tensor input) traced at ``example`` (input and state, or input alone)."""
    scripted = torch.jit.script(copy.deepcopy(model))
    forms = {"script": scripted, "script+load": saved_and_loaded(scripted)}
    if not isinstance(example[0], PackedSequence):
        traced = torch.jit.trace(copy.deepcopy(model), example)
        forms["trace"] = traced if len(example) == 2 else NoneState(traced)
    return forms


def check_against_eager(model, nn_model, inp, hx, other_inp=None, other_hx=None):
    """Every TorchScript form of model gives eager model's and eager nn_model's outputs and
    gradients, at the input it was traced at and (if given) another."""
    example = (inp,) if hx is None else (inp, hx)
    forms = compiled_forms(model, example)
    cases = [(inp, hx)] if other_inp is None else [(inp, hx), (other_inp, other_hx)]
    for x, state in cases:
        leaves = [
            t
            for t in (x.data if isinstance(x, PackedSequence) else x, *(state or ()))
            if t.requires_grad
        ]
        want = outputs_and_grads(model, x, state, leaves)
        assert_same(outputs_and_grads(nn_model, x, state, leaves), want, atol=1e-10, rtol=1e-10)
        for name, form in forms.items():
            got = outputs_and_grads(form, x, state, leaves)
            assert_same(want, got, **TIGHT), name


def states(config, batch, seed, unbatched=False):
    torch.manual_seed(seed)
    lead = config.get("num_layers", 1) * (2 if config.get("bidirectional") else 1)
    real_hidden = config.get("proj_size") or config["hidden_size"]
    shape = (lead,) if unbatched else (lead, batch)
    return (
        torch.randn(*shape, real_hidden, dtype=F64, requires_grad=True),
        torch.randn(*shape, config["hidden_size"], dtype=F64, requires_grad=True),
    )


def seq(shape, seed):
    torch.manual_seed(seed)
    return torch.randn(*shape, dtype=F64, requires_grad=True)


CONFIGS = [
    {"input_size": 3, "hidden_size": 4},
    {"input_size": 3, "hidden_size": 4, "batch_first": True},
    {"input_size": 3, "hidden_size": 4, "num_layers": 3, "bidirectional": True},
    {"input_size": 3, "hidden_size": 5, "proj_size": 2, "num_layers": 2},
    {"input_size": 3, "hidden_size": 5, "proj_size": 2, "bidirectional": True, "bias": False},
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_lstm_script_and_trace_match_eager(config, with_hx):
    (fused,), (lstm,) = fused_and_nn(config)

    def inputs(length, batch, seed):
        shape = (batch, length, 3) if config.get("batch_first") else (length, batch, 3)
        return seq(shape, seed), states(config, batch, seed + 1) if with_hx else None

    check_against_eager(Holder(fused), Holder(lstm), *inputs(5, 2, 0), *inputs(7, 3, 10))


@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_lstm_unbatched(with_hx):
    config = {"input_size": 3, "hidden_size": 4, "num_layers": 2, "bidirectional": True}
    (fused,), (lstm,) = fused_and_nn(config)
    hx = states(config, 1, 1, unbatched=True) if with_hx else None
    check_against_eager(Holder(fused), Holder(lstm), seq((5, 3), 0), hx)


@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_lstm_packed_sequence_scripted(with_hx):
    config = {"input_size": 3, "hidden_size": 4, "num_layers": 2}
    (fused,), (lstm,) = fused_and_nn(config)
    # Unsorted lengths, so the batch permutation of the states is exercised.
    packed = pack_sequence([seq((n, 3), n) for n in (2, 5, 3)], enforce_sorted=False)
    hx = states(config, 3, 1) if with_hx else None
    check_against_eager(PackedHolder(fused), PackedHolder(lstm), packed, hx)


def test_module_list_stack():
    config = {"input_size": 3, "hidden_size": 3, "num_layers": 2}
    fused, lstms = fused_and_nn(config, layers=2)
    check_against_eager(
        Stack(fused),
        Stack(lstms),
        seq((5, 2, 3), 0),
        states(config, 2, 1),
        seq((4, 3, 3), 2),
        states(config, 3, 3),
    )


def word_model_pair():
    config = {"input_size": 6, "hidden_size": 6, "num_layers": 2}
    (fused,), (lstm,) = fused_and_nn(config)
    model = WordModel(fused).double()
    reference = WordModel(lstm).double()
    reference.load_state_dict(model.state_dict())
    return model, reference, config


def test_word_model_matches_eager():
    model, reference, config = word_model_pair()
    tokens = torch.randint(0, 11, (5, 2))
    check_against_eager(
        model,
        reference,
        tokens,
        states(config, 2, 1),
        torch.randint(0, 11, (8, 3)),
        states(config, 3, 2),
    )


def train(model, steps=3):
    """Truncated-BPTT training as the word language model does it: the losses, then the
    parameters."""
    torch.manual_seed(5)
    batches = [torch.randint(0, 11, (6, 2)) for _ in range(steps)]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hidden = (torch.zeros(2, 2, 6, dtype=F64), torch.zeros(2, 2, 6, dtype=F64))
    losses = []
    for tokens in batches:
        opt.zero_grad()
        scores, hidden = model(tokens[:-1], hidden)
        hidden = (hidden[0].detach(), hidden[1].detach())
        loss = nn.functional.cross_entropy(scores.reshape(-1, 11), tokens[1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [*losses, *(p.detach() for p in model.parameters())]


def test_word_model_trains_like_eager():
    model, _, _ = word_model_pair()
    want = train(copy.deepcopy(model))
    example = (torch.randint(0, 11, (5, 2)), (torch.zeros(2, 2, 6, dtype=F64),) * 2)
    for name, form in compiled_forms(model, example).items():
        assert_same(want, train(form), **TIGHT), name
    assert not torch.equal(want[-1], model.decode.bias)  # it did train


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_cell_loop_matches_eager(bias, with_hx):
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4, bias=bias, dtype=F64)
    fused = FusedLSTMCell.from_lstm_cell(cell)

    def hx(batch, seed):
        torch.manual_seed(seed)
        return (
            tuple(torch.randn(batch, 4, dtype=F64, requires_grad=True) for _ in range(2))
            if with_hx
            else None
        )

    # A trace unrolls the Python loop at the example's length: the other input has another
    # batch only.
    check_against_eager(
        CellLoop(fused), CellLoop(cell), seq((5, 2, 3), 0), hx(2, 1), seq((5, 4, 3), 2), hx(4, 3)
    )


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [False, True], ids=["hx=None", "hx"])
def test_cell_scripted_and_traced_directly(batched, with_hx):
    torch.manual_seed(0)
    cell = nn.LSTMCell(3, 4, dtype=F64)
    fused = FusedLSTMCell.from_lstm_cell(cell)
    lead = (2,) if batched else ()
    x = seq((*lead, 3), 1)
    hx = tuple(seq((*lead, 4), k) for k in (2, 3)) if with_hx else None
    leaves = [x, *(hx or ())]
    want = cell_outputs_and_grads(fused, x, hx, leaves)
    assert_same(cell_outputs_and_grads(cell, x, hx, leaves), want, atol=1e-10, rtol=1e-10)
    for name, form in compiled_forms(fused, (x,) if hx is None else (x, hx)).items():
        assert_same(want, cell_outputs_and_grads(form, x, hx, leaves), **TIGHT), name


def test_loaded_in_a_fresh_process(tmp_path):
    """A saved scripted model runs where only torch and fused_lstm are imported."""
    model, _, config = word_model_pair()
    tokens = torch.randint(0, 11, (5, 2))
    hidden = states(config, 2, 1)
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.pt"))
    torch.save(
        {"tokens": tokens, "hidden": tuple(h.detach() for h in hidden)}, tmp_path / "inputs.pt"
    )
    script = (
        "import sys, torch, fused_lstm\n"
        "d = sys.argv[1]\n"
        "model = torch.jit.load(d + '/model.pt')\n"
        "inputs = torch.load(d + '/inputs.pt')\n"
        "scores, hidden = model(inputs['tokens'], inputs['hidden'])\n"
        "scores.sum().backward()\n"
        "grads = [p.grad for p in model.parameters()]\n"
        "torch.save([scores.detach(), *hidden, *grads], d + '/out.pt')\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300)
    scores, (h, c) = model(tokens, hidden)
    scores.sum().backward()
    want = [scores.detach(), h.detach(), c.detach(), *(p.grad for p in model.parameters())]
    assert_same(want, torch.load(tmp_path / "out.pt"), **TIGHT)


@pytest.fixture(scope="module")
def scripted_holder():
    return torch.jit.script(Holder(FusedLSTM(3, 4, 2).double()))


@pytest.mark.parametrize(
    "args, message",
    [
        ((seq((5, 2, 3, 1), 0),), "LSTM: Expected input to be 2D or 3D, got 4D instead"),
        ((seq((5, 2, 4), 0),), "input.size\\(-1\\) must be equal to input_size. Expected 3, got 4"),
        ((seq((0, 2, 3), 0),), "Expected sequence length to be larger than 0 in RNN"),
        (
            (seq((5, 2, 3), 0), (seq((2, 3, 4), 1), seq((2, 2, 4), 2))),
            "Expected hidden\\[0\\] size \\(2, 2, 4\\), got \\[2, 3, 4\\]",
        ),
        (
            (seq((5, 2, 3), 0), (seq((2, 2, 4), 1), seq((2, 2, 5), 2))),
            "Expected hidden\\[1\\] size \\(2, 2, 4\\), got \\[2, 2, 5\\]",
        ),
        (
            (seq((5, 3), 0), (seq((2, 1, 4), 1), seq((2, 1, 4), 2))),
            "For unbatched 2-D input, hx and cx should also be 2-D but got \\(3-D, 3-D\\) tensors",
        ),
        pytest.param(
            (seq((5, 2, 3), 0).float(),), "must have the dtype of input", marks=needs_extension
        ),  # the kernels' own check
    ],
)
def test_scripted_lstm_errors(scripted_holder, args, message):
    """The scripted form raises nn.LSTM's messages (tests/test_errors.py holds eager FusedLSTM
    to them), but for a wrong input dtype, which the op reports there."""
    # The interpreter raises torch.jit.Error for a Python raise, RuntimeError for the op's.
    with pytest.raises((torch.jit.Error, RuntimeError), match=message):
        scripted_holder(*args)


def test_scripted_model_follows_its_parameters():
    """The scripted forward reads the module's Parameters, not copies: load_state_dict and
    .double() on a saved and loaded model reach what it runs."""
    torch.manual_seed(0)
    eager = Holder(FusedLSTM(3, 4, 2, bidirectional=True))
    loaded = saved_and_loaded(torch.jit.script(copy.deepcopy(eager))).double()
    eager.double()
    state = {k: torch.randn_like(v) for k, v in eager.state_dict().items()}
    eager.load_state_dict(state)
    loaded.load_state_dict(state)
    x = seq((5, 2, 3), 1)
    assert_same(
        outputs_and_grads(eager, x, None, [x]), outputs_and_grads(loaded, x, None, [x]), **TIGHT
    )

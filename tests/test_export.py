"""Deploying a model that holds FusedLSTM / FusedLSTMCell: ONNX with both exporters (run in
onnxruntime), torch.export and AOTInductor, each exported at one sequence length and batch and
run at others, against eager mode.

The ONNX graphs must hold ONNX's own LSTM operator, one node a layer, also with proj_size, which
nn.LSTM cannot export, and with the default exporter, where nn.LSTM's graph fixes the sequence
length."""

import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.rnn import pack_sequence
from torch.utils._pytree import tree_leaves

from fused_lstm import FusedLSTM, FusedLSTMCell, _onnx
from helpers import assert_same

EXPORTERS = ["dynamo", "torchscript"]
F64 = torch.float64


class WordModel(nn.Module):
    """pytorch/examples' word language model (its --onnx-export exports ``(input, hidden)``):
    tokens and the hidden state in, scores and the next hidden state out."""

    def __init__(self, vocab=11, size=6, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, size)
        self.lstm = FusedLSTM(size, size, layers)
        self.decode = nn.Linear(size, vocab)

    def forward(self, x, hidden):
        out, hidden = self.lstm(self.embed(x), hidden)
        return self.decode(out), hidden


def export_onnx(model, args, dims, exporter, path):
    """Export with the sizes named in ``dims`` dynamic: per argument (nested as the arguments
    are) a dict {dim: name}. Returns the graph."""
    if exporter == "dynamo":
        symbols = {}

        def dynamic(d):
            if isinstance(d, tuple):
                return tuple(map(dynamic, d))
            return {k: symbols.setdefault(name, Dim(name)) for k, name in d.items()}

        torch.onnx.export(
            model, args, path, dynamo=True, dynamic_shapes=dynamic(tuple(dims)), verbose=False
        )
    else:
        flat = tree_leaves(dims, is_leaf=lambda d: isinstance(d, dict))
        names = [f"input{k}" for k in range(len(flat))]
        torch.onnx.export(
            model, args, path, dynamo=False, input_names=names, dynamic_axes=dict(zip(names, flat))
        )
    return onnx.load(path).graph


def run_onnx(path, args):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feeds = {i.name: a.numpy() for i, a in zip(session.get_inputs(), tree_leaves(args))}
    return [torch.from_numpy(r) for r in session.run(None, feeds)]


def check_onnx(model, args, new_args, dims, exporter, tmp_path, lstm_nodes):
    """Export ``model`` at ``args``, run the ONNX model in onnxruntime at ``new_args`` (other
    sizes), compare with eager mode; the graph holds ``lstm_nodes`` LSTM nodes and only ONNX's
    own operators."""
    path = str(tmp_path / "model.onnx")
    graph = export_onnx(model.eval(), args, dims, exporter, path)
    ops = [node.op_type for node in graph.node]
    assert ops.count("LSTM") == lstm_nodes, ops
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)
    with torch.no_grad():
        want = tree_leaves(model(*new_args))
    assert_same(want, run_onnx(path, new_args), atol=1e-5)


def state(lstm, batch=None):
    """A random (h_0, c_0) for ``lstm``; unbatched with ``batch`` None."""
    lead = (lstm.num_layers * (2 if lstm.bidirectional else 1),) + (
        () if batch is None else (batch,)
    )
    return (
        torch.randn(*lead, lstm.proj_size or lstm.hidden_size),
        torch.randn(*lead, lstm.hidden_size),
    )


# (constructor arguments, whether hx is passed); each exported at T=5, B=2, run at T=7, B=3
CASES = {
    "one-layer": (dict(num_layers=1), True),
    "two-layers-bidirectional-no-hx": (dict(num_layers=2, bidirectional=True), False),
    "three-layers-batch-first": (dict(num_layers=3, batch_first=True), True),
    "bidirectional-no-bias": (dict(num_layers=2, bidirectional=True, bias=False), True),
    "proj": (dict(proj_size=2), True),
    "proj-bidirectional-batch-first": (
        dict(num_layers=2, bidirectional=True, proj_size=2, batch_first=True),
        True,
    ),
    "proj-no-bias-no-hx": (dict(proj_size=3, bias=False), False),
}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", CASES)
def test_onnx_matches_eager_at_other_sizes(case, exporter, tmp_path):
    kwargs, with_hx = CASES[case]
    lstm = FusedLSTM(3, 4, **kwargs)
    time_dim, batch_dim = (1, 0) if lstm.batch_first else (0, 1)

    def inputs(T, B):
        shape = [0, 0, 3]
        shape[time_dim], shape[batch_dim] = T, B
        return (torch.randn(shape),) + ((state(lstm, B),) if with_hx else ())

    dims = [{time_dim: "T", batch_dim: "B"}] + ([({1: "B"}, {1: "B"})] if with_hx else [])
    check_onnx(
        lstm, inputs(5, 2), inputs(7, 3), dims, exporter, tmp_path, lstm_nodes=lstm.num_layers
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("with_hx", [True, False])
def test_onnx_unbatched(with_hx, exporter, tmp_path):
    lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True, proj_size=with_hx and 2)

    def inputs(T):
        return (torch.randn(T, 3),) + ((state(lstm),) if with_hx else ())

    dims = [{0: "T"}] + ([({}, {})] if with_hx else [])
    check_onnx(lstm, inputs(5), inputs(8), dims, exporter, tmp_path, lstm_nodes=2)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_word_model_takes_and_returns_the_state(exporter, tmp_path):
    model = WordModel()

    def inputs(T, B):
        return torch.randint(0, 11, (T, B)), state(model.lstm, B)

    check_onnx(
        model,
        inputs(5, 2),
        inputs(9, 4),
        [{0: "T", 1: "B"}, ({1: "B"}, {1: "B"})],
        exporter,
        tmp_path,
        lstm_nodes=2,
    )


def test_onnx_export_needs_no_arguments(tmp_path):
    """The issue's call, as pytorch/examples' word language model makes it: the default
    exporter, nothing but the model, its arguments and the path."""
    model = WordModel().eval()
    args = torch.randint(0, 11, (5, 2)), state(model.lstm, 2)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, args, path)
    with torch.no_grad():
        assert_same(tree_leaves(model(*args)), run_onnx(path, args), atol=1e-5)


class CellLoop(nn.Module):
    """FusedLSTMCell stepped over the steps of a fixed-length input, as seed 001 uses it."""

    def __init__(self, bias):
        super().__init__()
        self.cell = FusedLSTMCell(3, 4, bias=bias)

    def forward(self, x, hx):
        for step in x.unbind(0):
            hx = self.cell(step, hx)
        return hx


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("bias", [True, False])
def test_onnx_cell(bias, exporter, tmp_path):
    def inputs(B):
        return torch.randn(3, B, 3), (torch.randn(B, 4), torch.randn(B, 4))

    check_onnx(
        CellLoop(bias),
        inputs(2),
        inputs(5),
        [{1: "B"}, ({0: "B"}, {0: "B"})],
        exporter,
        tmp_path,
        lstm_nodes=3,
    )


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_packed_sequence_is_refused(exporter, tmp_path):
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FusedLSTM(3, 4)

        def forward(self, a, b):
            return self.lstm(pack_sequence([a, b]))

    with pytest.raises(Exception, match="PackedSequence input is not supported"):
        torch.onnx.export(
            Packed(),
            (torch.randn(5, 3), torch.randn(3, 3)),
            str(tmp_path / "model.onnx"),
            dynamo=exporter == "dynamo",
        )


@pytest.mark.parametrize(
    "layers,bidirectional,bias,proj_size",
    [(1, False, True, 0), (2, True, False, 0), (3, True, True, 2), (2, False, False, 3)],
)
def test_export_arithmetic_matches_nn_lstm_in_float64(layers, bidirectional, bias, proj_size):
    """What the ONNX graph computes, run eagerly (fused_lstm._onnx falls back to aten's LSTM
    there): the projection's rewriting is exact, not merely within float32's 1e-5."""
    ref = nn.LSTM(
        3, 5, layers, bias=bias, bidirectional=bidirectional, proj_size=proj_size, dtype=F64
    )
    x = torch.randn(6, 2, 3, dtype=F64)
    hx = tuple(s.double() for s in state(ref, 2))
    out, (h, c) = ref(x, hx)
    got = _onnx.lstm(
        x, None, *hx, ref._flat_weights, bias, proj_size > 0, layers, 0.0, False, bidirectional
    )
    assert_same([out, h, c], got, atol=1e-14)


def test_export_arithmetic_of_the_cell_matches_nn_lstm_cell_in_float64():
    ref = nn.LSTMCell(3, 5, dtype=F64)
    x, h0, c0 = (torch.randn(2, n, dtype=F64) for n in (3, 5, 5))
    assert_same(ref(x, (h0, c0)), _onnx.lstm_cell(x, h0, c0, *ref.parameters()), atol=1e-14)


# -- torch.export and AOTInductor -----------------------------------------------------------


def fused_ops(exported):
    return {str(n.target) for n in exported.graph.nodes if str(n.target).startswith("fused_lstm.")}


def batch_first_inputs(lstm, T, B, dtype=torch.float32):
    return torch.randn(B, T, 3, dtype=dtype), tuple(s.to(dtype) for s in state(lstm, B))


BATCH_FIRST_DIMS = ({0: Dim("B"), 1: Dim("T")}, ({1: Dim("B")}, {1: Dim("B")}))


def test_torch_export_dynamic_sizes_keeps_the_fused_ops():
    lstm = FusedLSTM(
        3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True, dtype=F64
    )
    exported = torch.export.export(
        lstm, batch_first_inputs(lstm, 5, 2, F64), dynamic_shapes=BATCH_FIRST_DIMS
    )
    assert fused_ops(exported)
    for T, B in ((7, 3), (1, 1), (5, 2)):
        args = batch_first_inputs(lstm, T, B, F64)
        assert_same(tree_leaves(lstm(*args)), tree_leaves(exported.module()(*args)), atol=1e-12)


def test_torch_export_cell_keeps_the_fused_op():
    cell = FusedLSTMCell(3, 4, dtype=F64)

    def inputs(B):
        return torch.randn(B, 3, dtype=F64), (
            torch.randn(B, 4, dtype=F64),
            torch.randn(B, 4, dtype=F64),
        )

    exported = torch.export.export(
        cell, inputs(2), dynamic_shapes=({0: Dim("B")}, ({0: Dim("B")}, {0: Dim("B")}))
    )
    assert fused_ops(exported)
    args = inputs(6)
    assert_same(cell(*args), exported.module()(*args), atol=1e-12)


def test_aot_inductor_package_matches_eager(tmp_path):
    lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True).eval()
    exported = torch.export.export(
        lstm, batch_first_inputs(lstm, 5, 2), dynamic_shapes=BATCH_FIRST_DIMS
    )
    path = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp_path / "model.pt2")
    )
    loaded = torch._inductor.aoti_load_package(path)
    args = batch_first_inputs(lstm, 9, 3)
    with torch.no_grad():
        assert_same(tree_leaves(lstm(*args)), tree_leaves(loaded(*args)), atol=1e-6)

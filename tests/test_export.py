"""Deploying a model that holds FusedLSTM / FusedLSTMCell: ONNX with both exporters (run in
onnxruntime), torch.export and AOTInductor, each exported at one sequence length and batch and
run at others, against eager mode.

The ONNX graphs must hold ONNX's own LSTM operator, one node a layer, also with proj_size, which
nn.LSTM cannot export, and with the default exporter, where nn.LSTM's graph fixes the sequence
length."""

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.rnn import pack_sequence

from fused_lstm import FusedLSTM, FusedLSTMCell
from helpers import assert_same

EXPORTERS = ["dynamo", "torchscript"]
NAMES = ["x", "h0", "c0"]


class Outputs(nn.Module):
    """The module with (h_0, c_0) as separate inputs (or none) and its outputs as a flat tuple."""

    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x, h0=None, c0=None):
        out, (h, c) = self.lstm(x, None if h0 is None else (h0, c0))
        return out, h, c


class WordModel(nn.Module):
    """pytorch/examples' word language model: tokens in, scores and the next hidden state out."""

    def __init__(self, vocab=11, size=6, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, size)
        self.lstm = FusedLSTM(size, size, layers)
        self.decode = nn.Linear(size, vocab)

    def forward(self, x, h0, c0):
        out, (h, c) = self.lstm(self.embed(x), (h0, c0))
        return self.decode(out), h, c


def export_onnx(model, args, dims, exporter, path):
    """Export with the sizes named in ``dims`` (per argument, {dim: name}) dynamic; the graph."""
    names = NAMES[:len(args)]
    if exporter == "dynamo":
        symbols = {name: Dim(name) for d in dims for name in d.values()}
        shapes = {n: {k: symbols[v] for k, v in d.items()} for n, d in zip(names, dims)}
        torch.onnx.export(model, args, path, dynamo=True, dynamic_shapes=shapes, verbose=False)
    else:
        torch.onnx.export(model, args, path, dynamo=False, input_names=names,
                          dynamic_axes=dict(zip(names, dims)))
    return onnx.load(path).graph


def run_onnx(path, args):
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [torch.from_numpy(r) for r in session.run(None, dict(zip(names, (a.numpy()
                                                                          for a in args))))]


def check_onnx(model, args, new_args, dims, exporter, tmp_path, lstm_nodes):
    path = str(tmp_path / "model.onnx")
    graph = export_onnx(model.eval(), args, dims, exporter, path)
    ops = [node.op_type for node in graph.node]
    assert ops.count("LSTM") == lstm_nodes, ops
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)
    with torch.no_grad():
        want = model(*new_args)
    got = run_onnx(path, new_args)
    assert_same(want, got, atol=1e-5)


def state(lstm, batch, *, batched=True):
    lead = (lstm.num_layers * (2 if lstm.bidirectional else 1),) + ((batch,) if batched else ())
    return (torch.randn(*lead, lstm.proj_size or lstm.hidden_size),
            torch.randn(*lead, lstm.hidden_size))


# (constructor arguments, whether hx is passed); each exported at T=5, B=2, run at T=7, B=3
CASES = {
    "one-layer": (dict(num_layers=1), True),
    "two-layers-bidirectional-no-hx": (dict(num_layers=2, bidirectional=True), False),
    "three-layers-batch-first": (dict(num_layers=3, batch_first=True), True),
    "bidirectional-no-bias": (dict(num_layers=2, bidirectional=True, bias=False), True),
    "proj": (dict(proj_size=2), True),
    "proj-bidirectional-batch-first": (dict(num_layers=2, bidirectional=True, proj_size=2,
                                            batch_first=True), True),
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
        return (torch.randn(shape), *(state(lstm, B) if with_hx else ()))

    dims = [{time_dim: "T", batch_dim: "B"}] + ([{1: "B"}, {1: "B"}] if with_hx else [])
    check_onnx(Outputs(lstm), inputs(5, 2), inputs(7, 3), dims, exporter, tmp_path,
               lstm_nodes=lstm.num_layers)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("with_hx", [True, False])
def test_onnx_unbatched(with_hx, exporter, tmp_path):
    lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True, proj_size=with_hx and 2)

    def inputs(T):
        return (torch.randn(T, 3), *(state(lstm, None, batched=False) if with_hx else ()))

    check_onnx(Outputs(lstm), inputs(5), inputs(8), [{0: "T"}] + [{}] * (2 * with_hx),
               exporter, tmp_path, lstm_nodes=2)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_word_model_takes_and_returns_the_state(exporter, tmp_path):
    model = WordModel()

    def inputs(T, B):
        return (torch.randint(0, 11, (T, B)), *state(model.lstm, B))

    check_onnx(model, inputs(5, 2), inputs(9, 4), [{0: "T", 1: "B"}, {1: "B"}, {1: "B"}],
               exporter, tmp_path, lstm_nodes=2)


class CellLoop(nn.Module):
    """FusedLSTMCell stepped over a fixed number of steps, as seed 001 uses it."""

    def __init__(self, bias):
        super().__init__()
        self.cell = FusedLSTMCell(3, 4, bias=bias)

    def forward(self, x, h0, c0):
        h, c = h0, c0
        for step in x.unbind(0):
            h, c = self.cell(step, (h, c))
        return h, c


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("bias", [True, False])
def test_onnx_cell(bias, exporter, tmp_path):
    def inputs(B):
        return torch.randn(3, B, 3), torch.randn(B, 4), torch.randn(B, 4)

    check_onnx(CellLoop(bias), inputs(2), inputs(5), [{1: "B"}, {0: "B"}, {0: "B"}], exporter,
               tmp_path, lstm_nodes=3)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_packed_sequence_is_refused(exporter, tmp_path):
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = FusedLSTM(3, 4)

        def forward(self, a, b):
            out, (h, c) = self.lstm(pack_sequence([a, b]))
            return out.data, h, c

    with pytest.raises(Exception, match="PackedSequence input is not supported"):
        torch.onnx.export(Packed(), (torch.randn(5, 3), torch.randn(3, 3)),
                          str(tmp_path / "model.onnx"), dynamo=exporter == "dynamo")


def test_eager_unchanged_after_export(tmp_path):
    lstm = FusedLSTM(3, 4)
    x = torch.randn(5, 2, 3)
    want = Outputs(lstm)(x)
    export_onnx(Outputs(lstm), (x,), [{}], "torchscript", str(tmp_path / "model.onnx"))
    assert_same(want, Outputs(lstm)(x), atol=0)


# -- torch.export and AOTInductor -----------------------------------------------------------


def fused_ops(exported):
    return {str(n.target) for n in exported.graph.nodes if str(n.target).startswith("fused_lstm.")}


def test_torch_export_dynamic_sizes_keeps_the_fused_ops():
    lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True,
                     dtype=torch.float64)

    def inputs(T, B):
        return (torch.randn(B, T, 3, dtype=torch.float64),
                *(s.double() for s in state(lstm, B)))

    T, B = Dim("T"), Dim("B")
    exported = torch.export.export(Outputs(lstm), inputs(5, 2),
                                   dynamic_shapes=({0: B, 1: T}, {1: B}, {1: B}))
    assert fused_ops(exported)
    for sizes in ((7, 3), (1, 1), (5, 2)):
        args = inputs(*sizes)
        assert_same(Outputs(lstm)(*args), exported.module()(*args), atol=1e-12)


def test_torch_export_cell_keeps_the_fused_op():
    cell = FusedLSTMCell(3, 4, dtype=torch.float64)
    B = Dim("B")
    args = [torch.randn(2, n, dtype=torch.float64) for n in (3, 4, 4)]
    exported = torch.export.export(cell, (args[0], tuple(args[1:])),
                                   dynamic_shapes=({0: B}, ({0: B}, {0: B})))
    assert fused_ops(exported)
    args = [torch.randn(6, n, dtype=torch.float64) for n in (3, 4, 4)]
    assert_same(cell(args[0], tuple(args[1:])), exported.module()(args[0], tuple(args[1:])),
                atol=1e-12)


def test_aot_inductor_package_matches_eager(tmp_path):
    lstm = FusedLSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2, batch_first=True)

    def inputs(T, B):
        return torch.randn(B, T, 3), *state(lstm, B)

    T, B = Dim("T"), Dim("B")
    model = Outputs(lstm).eval()
    exported = torch.export.export(model, inputs(5, 2),
                                   dynamic_shapes=({0: B, 1: T}, {1: B}, {1: B}))
    path = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    args = inputs(9, 3)
    with torch.no_grad():
        assert_same(model(*args), loaded(*args), atol=1e-6)

"""gate_trace against a step-by-step recomputation of every gate from nn.LSTM's weights."""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fused_lstm
from fused_lstm import FusedLSTM, gate_trace


def by_hand(lstm: nn.LSTM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The lectures' cell, written out per step, for time-major batched x (T, B, I)."""
    D = 2 if lstm.bidirectional else 1
    sfx = ["", "_reverse"]
    out = {k: [] for k in "ifgoch"}
    layer_in = x
    for layer in range(lstm.num_layers):
        outputs = []
        for d in range(D):
            w = {
                k: getattr(lstm, f"{k}_l{layer}{sfx[d]}", None)
                for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
            }
            B, H = x.shape[1], lstm.hidden_size
            h = x.new_zeros(B, w["weight_hh"].shape[1])
            c = x.new_zeros(B, H)
            rec = {k: [None] * x.shape[0] for k in "ifgoch"}
            ys = [None] * x.shape[0]
            steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
            for t in steps:
                z = layer_in[t] @ w["weight_ih"].t() + h @ w["weight_hh"].t()
                if lstm.bias:
                    z = z + w["bias_ih"] + w["bias_hh"]
                i, f, g, o = z.chunk(4, 1)
                i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
                c = f * c + i * g
                m = o * c.tanh()
                h = m @ w["weight_hr"].t() if lstm.proj_size else m
                for k, v in zip("ifgoch", (i, f, g, o, c, m)):
                    rec[k][t] = v
                ys[t] = h
            for k in "ifgoch":
                out[k].append(torch.stack(rec[k]))
            outputs.append(torch.stack(ys))
        layer_in = torch.cat(outputs, -1)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.backends("reference", "cpu")
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(num_layers=2, bidirectional=True),
        dict(num_layers=3, bidirectional=True, proj_size=2, bias=False),
        dict(batch_first=True, num_layers=2),
    ],
)
def test_gate_trace_matches_the_cell_by_hand(backend, kw):
    lstm = nn.LSTM(3, 5, dtype=torch.float64, **kw)
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    trace = gate_trace(FusedLSTM.from_lstm(lstm), x.transpose(0, 1) if lstm.batch_first else x)
    want = by_hand(lstm, x)
    L = lstm.num_layers * (2 if lstm.bidirectional else 1)
    assert set(trace) == set("ifgoch")
    for k in "ifgoch":
        assert trace[k].shape == (L, 7, 4, 5), k
        torch.testing.assert_close(trace[k], want[k], atol=1e-12, rtol=0, msg=k)


@pytest.mark.backends("reference", "cpu")
def test_unbatched_packed_and_nn_lstm_inputs(backend):
    lstm = nn.LSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    fused = FusedLSTM.from_lstm(lstm)
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    full = gate_trace(fused, x)

    single = gate_trace(lstm, x[:, 1])  # an nn.LSTM module, unbatched input
    assert single["i"].shape == (4, 6, 5)
    for k in "ifgoch":
        torch.testing.assert_close(single[k], full[k][:, :, 1], atol=1e-12, rtol=0)

    lengths = torch.tensor([4, 6, 2])  # unsorted: the trace comes back in the original order
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    traced = gate_trace(fused, packed)
    for b, n in enumerate(lengths.tolist()):
        alone = gate_trace(fused, x[:n, b])
        for k in "ifgoch":
            assert traced[k].shape == (4, 6, 3, 5)
            torch.testing.assert_close(traced[k][:, :n, b], alone[k], atol=1e-12, rtol=0)
            assert not traced[k][:, n:, b].any()


def test_trace_is_the_native_workspace_and_leaves_no_graph():
    if "cpu" not in fused_lstm.native_backends():
        pytest.skip("the native CPU kernel is not built")
    fused = FusedLSTM(3, 5)
    x = torch.randn(8, 2, 3)
    trace = gate_trace(fused, x)
    assert all(not t.requires_grad for t in trace.values())
    out, (h_n, c_n) = fused(x)
    torch.testing.assert_close(trace["h"][0], out, atol=0, rtol=0)
    torch.testing.assert_close(trace["c"][0, -1], c_n[0], atol=0, rtol=0)


def test_gate_trace_rejects_other_modules():
    with pytest.raises(TypeError, match="FusedLSTM or nn.LSTM"):
        gate_trace(nn.GRU(3, 5), torch.randn(4, 3))

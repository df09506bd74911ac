"""The programs in examples/, each in its quick mode: it trains, its loss falls, and what it
prints or draws is what it claims to be."""

import importlib
import pathlib
import sys

import pytest
import torch

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their shared _common module by name


def example(name):
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _one_thread():
    # As the examples do when run as scripts: their models are small, and on a busy machine a
    # second thread makes them several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_text_data_is_the_lectures_encoding():
    x, y, chars = example("_common").text_data("abcdabcD")
    assert chars == ["a", "b", "c", "d", "D"]  # the lecture's {'a':0,'b':1,'c':2,'d':3,'D':4}
    assert x.shape == y.shape == (799, 5)
    text = "".join(chars[k] for k in x.argmax(1)) + chars[y[-1].argmax()]
    assert text == "abcdabcD" * 100
    assert torch.equal(x[1:], y[:-1])


def test_next_number():
    result = example("next_number").main(["--quick"])
    losses = result["losses"]
    assert len(losses) == 40
    assert losses[-1] < 0.5 * losses[0]
    assert len(result["prediction"]) == 4


def test_stacked():
    result = example("stacked").main(["--quick"])
    assert result["losses"][-1] < 0.2 * result["losses"][0]
    # FusedLSTM(num_layers=2) is the seed's loop over two stacked cells.
    assert result["loop_difference"] < 1e-5


def test_bidirectional_prints_the_seeds_shapes():
    result = example("bidirectional").main(["--quick"])
    assert result["shapes"] == [(4, 6, 128), (6, 4, 64), (6, 4, 256)]  # the seed's printout
    assert result["nn_lstm_shapes"] == result["shapes"]
    assert result["difference"] < 1e-5
    # Fresh random batches every step: the loss is noisy, so compare averages of five.
    losses = result["losses"]
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])


def test_rnn_vs_lstm():
    results = example("rnn_vs_lstm").main(["--quick"])
    assert set(results) == {"abcabC", "abcdabcD"}
    for pattern, runs in results.items():
        for kind in ("RNN", "LSTM"):
            (run,) = runs[kind]
            assert len(run["losses"]) == 40
            # From about ln(4) or ln(5) at the start to the no-memory level (0.235, 0.175) or below.
            assert run["losses"][-1] < 0.5 * run["losses"][0], (pattern, kind)
            assert 0.0 <= run["context_accuracy"] <= 1.0


def test_abab_gates_draws_the_gate_trace(tmp_path):
    abab = example("abab_gates")
    result = abab.main(["--quick", "--out", str(tmp_path)])
    assert result["losses"][-1] < 0.1 * result["losses"][0]

    assert [f.name for f in result["files"]] == ["abab_gates.png", "abab_states.png"]
    for path in result["files"]:
        assert path.parent == tmp_path
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000

    shown = result["shown"]
    assert set(shown) == {*"ifgoch", "yhat"}
    last = abab.LAST
    trace = abab.gate_trace(result["model"], result["x"], result["hx"])
    for name in "ifgoch":
        assert shown[name].shape == (2, last), name  # hidden units x time steps
        torch.testing.assert_close(shown[name], trace[name][0, -last:].T, msg=name)

    # And the trace is the LSTM's: the lecture's step-by-step cell on nn.LSTM's copy of the
    # trained weights gives the same gates and states.
    lstm = torch.nn.LSTM(3, 2)
    lstm.load_state_dict(result["model"].state_dict())
    h, c = (s[0] for s in result["hx"])
    by_hand = {name: [] for name in "ifgoch"}
    with torch.no_grad():
        for xt in result["x"]:
            ifgo = (
                xt @ lstm.weight_ih_l0.T
                + h @ lstm.weight_hh_l0.T
                + lstm.bias_ih_l0
                + lstm.bias_hh_l0
            )
            i, f, g, o = ifgo.chunk(4)
            i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
            c = f * c + i * g
            h = o * c.tanh()
            for name, value in zip("ifgoch", (i, f, g, o, c, h)):
                by_hand[name].append(value)
        hidden, _ = lstm(result["x"], result["hx"])
        yhat = torch.softmax(result["linr"](hidden), dim=1)
    for name in "ifgoch":
        want = torch.stack(by_hand[name][-last:]).T
        torch.testing.assert_close(shown[name], want, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(shown["yhat"], yhat[-last:].T, rtol=1e-4, atol=1e-5)


def test_abcd():
    ref, fused = example("abcd").main(["--quick"])
    assert len(fused) == 60
    assert fused[-1] < 0.5 * fused[0]


def test_episodes_with_reset():
    result = example("episodes").main(["--quick"])
    with_reset, without = result["with_reset"], result["without_reset"]
    assert len(with_reset["losses"]) == 40
    assert with_reset["losses"][-1] < 0.5 * with_reset["losses"][0]
    # Told where episodes start, the model learns the latch; without, it cannot clear it.
    assert with_reset["accuracy"] > 0.95
    assert with_reset["accuracy"] > without["accuracy"] + 0.1
    # FusedLSTM(reset=...) is RecurrentPPO's step loop with its state masking, in one call.
    assert result["loop_difference"] < 1e-5


@pytest.mark.backends("reference", "cpu")
def test_abcd_trajectory_follows_nn_lstm(backend):
    """The abcdabcD exercise from seed 003: FusedLSTM follows nn.LSTM's loss trajectory."""
    ref, fused = example("abcd").main(steps=60, every=30)
    assert fused == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert fused[-1] < 0.5 * fused[0]  # and it learns

"""The abcdabcD exercise from seed 003: FusedLSTM follows nn.LSTM's loss trajectory."""

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import abcd  # noqa: E402


def test_abcd_trajectory_follows_nn_lstm(backend):
    ref, fused = abcd.main(steps=60, every=30)
    assert fused == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert fused[-1] < 0.5 * fused[0]  # and it learns

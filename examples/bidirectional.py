"""Seed 004's bidirectional three-layer LSTM with proj_size, on FusedLSTM.

First the seed's cells verbatim: input_size 128, hidden size 256 (the seed calls it
ouput_size), 3 layers, bidirectional, proj_size 64, batch_first, a batch of 4 sequences of 6
steps and random h_0, c_0; it prints the shapes of outputs, h_n and c_n. An nn.LSTM holding the
same weights runs beside it, and the two must agree in shape and value.

The seed trains nothing, so the same model then learns a task that needs the backward
direction: at every step, write out the vector that comes next in the sequence (its first 8
features, through a Linear layer on the 128 = 2 x 64 output features). The inputs are random, so
a forward-only LSTM cannot beat guessing zero (loss 1, their variance); the backward direction
has just read that vector. Fresh random batches every step, MSE, Adam (lr 0.003).

    python examples/bidirectional.py [--quick] [--steps 200]
"""

import warnings

import torch
import torch.nn as nn

from fused_lstm import FusedLSTM

from _common import parse_args, train

input_size = 128
ouput_size = 256
num_layers = 3
bidirectional = True
proj_size = 64
batch_size = 4
sequence_len = 6


def seed_shapes() -> dict:
    """The seed's forward pass on FusedLSTM and on nn.LSTM with the same weights."""
    reference = nn.LSTM(
        input_size=input_size,
        hidden_size=ouput_size,
        num_layers=num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    model = FusedLSTM.from_lstm(reference)
    inputs = torch.randn(batch_size, sequence_len, input_size)
    h_0 = torch.rand(
        num_layers * (int(bidirectional) + 1),
        batch_size,
        proj_size if proj_size > 0 else ouput_size,
    )
    c_0 = torch.rand(num_layers * (int(bidirectional) + 1), batch_size, ouput_size)

    outputs, (h_n, c_n) = model(inputs, (h_0, c_0))
    print(outputs.shape)
    print(h_n.shape)
    print(c_n.shape)

    with warnings.catch_warnings():
        # nn.LSTM tells that oneDNN has no projections and it falls back to its own loop.
        warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
        ref_outputs, (ref_h_n, ref_c_n) = reference(inputs, (h_0, c_0))
    shapes = [tuple(t.shape) for t in (outputs, h_n, c_n)]
    ref_shapes = [tuple(t.shape) for t in (ref_outputs, ref_h_n, ref_c_n)]
    difference = max(
        (a - b).abs().max().item()
        for a, b in zip((outputs, h_n, c_n), (ref_outputs, ref_h_n, ref_c_n))
    )
    print(
        f"nn.LSTM with the same weights: shapes {'agree' if shapes == ref_shapes else 'DIFFER'}"
        f" {ref_shapes}, max |difference| {difference:.1e}"
    )
    return {"shapes": shapes, "nn_lstm_shapes": ref_shapes, "difference": difference}


def main(argv=None) -> dict:
    """Returns ``{"losses": [...], "shapes": ..., "nn_lstm_shapes": ..., "difference": ...}``."""
    args = parse_args(argv, __doc__, steps=200, quick_steps=60)
    torch.manual_seed(0)
    result = seed_shapes()

    model = FusedLSTM(
        input_size=input_size,
        hidden_size=ouput_size,
        num_layers=num_layers,
        batch_first=True,
        bidirectional=bidirectional,
        proj_size=proj_size,
    )
    readout = nn.Linear(2 * proj_size, 8)
    loss_fn = nn.MSELoss()

    def compute_loss():
        inputs = torch.randn(32, sequence_len, input_size)
        outputs, _ = model(inputs)
        return loss_fn(readout(outputs[:, :-1]), inputs[:, 1:, :8])

    result["losses"] = train(
        [*model.parameters(), *readout.parameters()],
        compute_loss,
        steps=args.steps,
        lr=3e-3,
        every=args.every,
    )
    return result


if __name__ == "__main__":
    torch.set_num_threads(1)  # small models: a second thread only waits (README, Examples)
    main()

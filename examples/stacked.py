"""Seed 002's two-layer stacked LSTM, on FusedLSTM(num_layers=2).

The seed stacks two LSTM cells (10 input features, 50 hidden units) in a ModuleList, steps them
through the sequence layer by layer, and reads one value out of the last layer's final hidden
state with a Linear layer. Here the stack is one FusedLSTM(10, 50, num_layers=2). The seed
prints the model and runs one sample of 5 steps; it trains nothing, so this example gives it the
time series its comments describe: each of the 5 steps carries a window of 10 consecutive values
of a two-tone sine wave, and the model predicts the value that follows the 50 it has read
(MSE, Adam lr 0.01). At the end the seed's cell-by-cell stack, built from FusedLSTMCells holding
the trained layers' weights, must give the same predictions: num_layers=2 is that loop.

    python examples/stacked.py [--quick] [--steps 200]
"""

import torch
import torch.nn as nn

from fused_lstm import FusedLSTM, FusedLSTMCell

from _common import parse_args, train


class LSTM(nn.Module):
    def __init__(self, input_window_size, hidden_size, num_layers):
        super().__init__()
        self.lstm = FusedLSTM(input_window_size, hidden_size, num_layers, batch_first=True)
        self.fc = nn.Linear(hidden_size, 1)

    def forward(self, x):
        _, (h, c) = self.lstm(x)  # h: (num_layers, batch, hidden), zero initial state
        return self.fc(h[-1])


def seed_cell_loop(model: LSTM, x: torch.Tensor) -> torch.Tensor:
    """The seed's forward: a cell per layer, time outer loop, layer inner loop."""
    lstm = model.lstm
    cells = []
    for k in range(lstm.num_layers):
        cell = FusedLSTMCell(lstm.input_size if k == 0 else lstm.hidden_size, lstm.hidden_size)
        cell.load_state_dict(
            {
                name: getattr(lstm, f"{name}_l{k}")
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
            }
        )
        cells.append(cell)
    batch_size, seq_len, _ = x.size()
    h = [x.new_zeros(batch_size, lstm.hidden_size) for _ in cells]
    c = [x.new_zeros(batch_size, lstm.hidden_size) for _ in cells]
    for t in range(seq_len):
        x_t = x[:, t, :]
        for i, cell in enumerate(cells):
            h[i], c[i] = cell(x_t, (h[i], c[i]))
            x_t = h[i]
    return model.fc(h[-1])


def windows(num_samples=1000, seq_len=5, input_window_size=10):
    """Samples of ``seq_len`` steps, each a window of ``input_window_size`` consecutive values of
    the series, and the value right after the last window as the target."""
    n = torch.arange(num_samples + seq_len * input_window_size, dtype=torch.float32)
    series = torch.sin(0.1 * n) + 0.5 * torch.sin(0.37 * n)
    span = seq_len * input_window_size
    x = torch.stack([series[s : s + span] for s in range(num_samples)])
    y = series[span : span + num_samples].unsqueeze(-1)
    return x.view(num_samples, seq_len, input_window_size), y


def main(argv=None) -> dict:
    """Returns ``{"losses": [...], "loop_difference": max |seed loop - FusedLSTM|}``."""
    args = parse_args(argv, __doc__, steps=200, quick_steps=30)
    torch.manual_seed(0)
    input_window_size, hidden_size, num_layers = 10, 50, 2
    model = LSTM(input_window_size, hidden_size, num_layers)
    print(model)
    sample_input = torch.randn(1, 5, input_window_size)
    output = model(sample_input)
    print("sample_input:", tuple(sample_input.shape), "-> output:", tuple(output.shape))

    x, y = windows(seq_len=5, input_window_size=input_window_size)
    loss_fn = nn.MSELoss()
    losses = train(
        model.parameters(),
        lambda: loss_fn(model(x), y),
        steps=args.steps,
        lr=0.01,
        every=args.every,
    )

    with torch.no_grad():
        difference = (seed_cell_loop(model, x) - model(x)).abs().max().item()
    print(f"the seed's cell-by-cell loop on the same weights: max |difference| {difference:.2e}")
    return {"losses": losses, "loop_difference": difference}


if __name__ == "__main__":
    torch.set_num_threads(1)  # small models: a second thread only waits (README, Examples)
    main()

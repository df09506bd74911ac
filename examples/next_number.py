"""Seed 001's next-number predictor, on FusedLSTMCell.

Every sample is five consecutive integers from a random start in 0..9; the model reads the first
four and predicts, at every step, the number that follows (X = [2, 3, 4, 5] -> Y = [3, 4, 5, 6]).
The model is the seed's MyLSTM: one LSTM cell stepped through the sequence by a for loop with a
Linear layer on every hidden state, trained with MSE and Adam (lr 0.01) for 200 epochs on 1000
samples. The seed's hand-written LSTMCell is replaced by FusedLSTMCell, which takes
``(x_t, (h, c))`` like nn.LSTMCell. At the end it predicts the sequence after [5, 6, 7, 8].

    python examples/next_number.py [--quick] [--steps 200] [--every 5]
"""

import torch
import torch.nn as nn

from fused_lstm import FusedLSTMCell

from _common import parse_args, train


class MyLSTM(nn.Module):
    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.lstm_cell = FusedLSTMCell(input_size, hidden_size)
        self.fc = nn.Linear(hidden_size, output_size)

    def forward(self, inputs):
        batch_size, seq_len, _ = inputs.size()
        h_t = torch.zeros(batch_size, self.hidden_size, device=inputs.device)
        c_t = torch.zeros(batch_size, self.hidden_size, device=inputs.device)
        outputs = []
        for t in range(seq_len):
            h_t, c_t = self.lstm_cell(inputs[:, t, :], (h_t, c_t))
            outputs.append(self.fc(h_t).unsqueeze(1))
        return torch.cat(outputs, dim=1)


def generate_data(seq_length=5, num_samples=1000):
    X, Y = [], []
    for _ in range(num_samples):
        start = torch.randint(0, 10, (1,)).item()
        seq = torch.arange(start, start + seq_length)
        X.append(seq[:-1].unsqueeze(-1).float())
        Y.append(seq[1:].unsqueeze(-1).float())
    return torch.stack(X), torch.stack(Y)


def main(argv=None) -> dict:
    """Returns ``{"losses": [...], "prediction": [...]}``, the prediction after [5, 6, 7, 8]."""
    args = parse_args(argv, __doc__, steps=200, quick_steps=40)
    torch.manual_seed(0)
    model = MyLSTM(input_size=1, hidden_size=16, output_size=1)
    X_train, Y_train = generate_data(seq_length=5, num_samples=1000)
    criterion = nn.MSELoss()

    losses = train(
        model.parameters(),
        lambda: criterion(model(X_train), Y_train),
        steps=args.steps,
        lr=0.01,
        every=args.every,
    )

    model.eval()
    with torch.no_grad():
        test_input = torch.tensor([[[5], [6], [7], [8]]]).float()
        prediction = model(test_input).squeeze(-1).squeeze(0).tolist()
    print("Input Sequence: ", test_input.squeeze(-1).squeeze(0).tolist())
    print("Predicted Next Sequence: ", [round(p, 2) for p in prediction])
    return {"losses": losses, "prediction": prediction}


if __name__ == "__main__":
    torch.set_num_threads(1)  # small models: a second thread only waits (README, Examples)
    main()

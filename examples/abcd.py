"""The abcdabcD exercise of the lectures (seed 003): predict the next character of
'abcdabcD' * 100 with a 4-unit LSTM, trained on the whole 799-step sequence with Adam (lr 0.1).
FusedLSTM and nn.LSTM start from the same weights and print their losses side by side.

    python examples/abcd.py [--steps 200]
"""

import argparse
import time

import torch

import fused_lstm
from fused_lstm import FusedLSTM


def data():
    txt = list("abcdabcD") * 100
    mapping = {"a": 0, "b": 1, "c": 2, "d": 3, "D": 4}
    idx = torch.tensor([mapping[ch] for ch in txt])
    one_hot = torch.nn.functional.one_hot(idx).float()
    return one_hot[:-1], one_hot[1:]


def train(lstm, linr, x, y, steps):
    opt = torch.optim.Adam(list(lstm.parameters()) + list(linr.parameters()), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    water = torch.zeros(1, lstm.hidden_size)
    losses = []
    for _ in range(steps):
        hidden, _ = lstm(x, (water, water))
        loss = loss_fn(linr(hidden), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main(steps: int = 200, every: int = 20) -> tuple[list[float], list[float]]:
    x, y = data()
    torch.manual_seed(43052)
    lstm = torch.nn.LSTM(5, 4)
    linr = torch.nn.Linear(4, 5)
    fused = FusedLSTM.from_lstm(lstm)
    linr_f = torch.nn.Linear(4, 5)
    linr_f.load_state_dict(linr.state_dict())

    t0 = time.perf_counter()
    ref_losses = train(lstm, linr, x, y, steps)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused_losses = train(fused, linr_f, x, y, steps)
    t_fused = time.perf_counter() - t0

    print(f"native kernels: {sorted(fused_lstm.native_backends()) or 'none (reference)'}")
    print(f"{'step':>5} {'nn.LSTM':>10} {'FusedLSTM':>10}")
    for k in range(0, steps, every):
        print(f"{k:5d} {ref_losses[k]:10.5f} {fused_losses[k]:10.5f}")
    print(f"{steps:5d} {ref_losses[-1]:10.5f} {fused_losses[-1]:10.5f}")
    print(f"training time: nn.LSTM {t_ref:.2f} s, FusedLSTM {t_fused:.2f} s "
          f"({t_ref / t_fused:.1f}x)")
    return ref_losses, fused_losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    main(parser.parse_args().steps)

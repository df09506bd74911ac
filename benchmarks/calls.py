"""The fixed cost of one module call on the CPU: a FusedLSTMCell step and a short FusedLSTM
sequence, with and without autograd, against nn.LSTMCell / nn.LSTM, on one thread.

    python benchmarks/calls.py [--reps N]

Sizes are the seeds' (I=5, H=4, B=1, and T=5 for the sequence), where the arithmetic is well
under a microsecond and everything else is the per-call cost: validation, dispatch, autograd.
"grad" is forward + backward of a loss of the outputs with the inputs and parameters requiring
grad; "no grad" is the forward under torch.no_grad(). Each figure is the median over --reps
blocks of torch.utils.benchmark's blocked_autorange, in microseconds.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.benchmark import Timer

import fused_lstm

I, H, B, T = 5, 4, 1, 5


def cases():
    cell, lstm = nn.LSTMCell(I, H), nn.LSTM(I, H)
    mods = {
        "cell": (cell, fused_lstm.FusedLSTMCell.from_lstm_cell(cell)),
        "lstm": (lstm, fused_lstm.FusedLSTM.from_lstm(lstm)),
    }
    x_cell, x_seq = torch.randn(B, I, requires_grad=True), torch.randn(T, B, I, requires_grad=True)
    hx = (torch.zeros(B, H), torch.zeros(B, H))

    def cell_grad(m):
        h, c = m(x_cell, hx)
        (h.sum() + c.sum()).backward()

    def lstm_grad(m):
        out, (h, c) = m(x_seq)
        (out.sum() + c.sum()).backward()

    def no_grad(m, x, *args):
        with torch.no_grad():
            m(x, *args)

    for kind, (ref, fused) in mods.items():
        x, grad = (x_cell, cell_grad) if kind == "cell" else (x_seq, lstm_grad)
        extra = (hx,) if kind == "cell" else ()
        for name, m in (("nn", ref), ("fused", fused)):
            yield f"{kind} grad", name, lambda m=m, g=grad: g(m)
            yield f"{kind} no grad", name, lambda m=m, x=x, e=extra: no_grad(m, x, *e)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows: dict[str, dict[str, float]] = {}
    for case, name, fn in cases():
        fn()  # warm-up
        times = [
            Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median
            for _ in range(args.reps)
        ]
        rows.setdefault(case, {})[name] = sorted(times)[len(times) // 2] * 1e6
    print(f"{'case':<16}{'nn (us)':>10}{'fused (us)':>12}{'nn / fused':>12}")
    for case, t in rows.items():
        print(f"{case:<16}{t['nn']:>10.1f}{t['fused']:>12.1f}{t['nn'] / t['fused']:>12.2f}")


if __name__ == "__main__":
    main()

"""The abcdabcD exercise of the lectures (seed 003): predict the next character of
'abcdabcD' * 100 with a 4-unit LSTM, trained on the whole 799-step sequence with Adam (lr 0.1).
FusedLSTM and nn.LSTM start from the same weights and print their losses side by side.

    python examples/abcd.py [--steps 200] [--quick]
"""

import time

import torch

import fused_lstm
from fused_lstm import FusedLSTM

from _common import parse_args, text_data, train, water


def fit(lstm, linr, x, y, steps):
    loss_fn = torch.nn.CrossEntropyLoss()

    def compute_loss():
        hidden, _ = lstm(x, water(lstm))
        return loss_fn(linr(hidden), y)

    return train([*lstm.parameters(), *linr.parameters()], compute_loss, steps=steps, lr=0.1)


def main(argv=None, *, steps=None, every=None) -> tuple[list[float], list[float]]:
    """Returns the (nn.LSTM, FusedLSTM) losses of every step. ``steps`` and ``every`` are the
    command line's --steps and --every, for callers in Python."""
    argv = list(argv or [])
    argv += ["--steps", str(steps)] if steps is not None else []
    argv += ["--every", str(every)] if every is not None else []
    args = parse_args(argv or None, __doc__, steps=200, quick_steps=60)

    x, y, _ = text_data("abcdabcD")
    torch.manual_seed(43052)
    lstm = torch.nn.LSTM(5, 4)
    linr = torch.nn.Linear(4, 5)
    fused = FusedLSTM.from_lstm(lstm)
    linr_f = torch.nn.Linear(4, 5)
    linr_f.load_state_dict(linr.state_dict())

    t0 = time.perf_counter()
    ref_losses = fit(lstm, linr, x, y, args.steps)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    fused_losses = fit(fused, linr_f, x, y, args.steps)
    t_fused = time.perf_counter() - t0

    print(f"native kernels: {sorted(fused_lstm.native_backends()) or 'none (reference)'}")
    print(f"{'step':>5} {'nn.LSTM':>10} {'FusedLSTM':>10}")
    for k in range(0, args.steps, args.every):
        print(f"{k:5d} {ref_losses[k]:10.5f} {fused_losses[k]:10.5f}")
    print(f"{args.steps:5d} {ref_losses[-1]:10.5f} {fused_losses[-1]:10.5f}")
    print(
        f"training time: nn.LSTM {t_ref:.2f} s, FusedLSTM {t_fused:.2f} s ({t_ref / t_fused:.1f}x)"
    )
    return ref_losses, fused_losses


if __name__ == "__main__":
    main()

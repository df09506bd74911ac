"""Seed 003's "RNN vs LSTM 성능비교실험": torch.nn.RNN against FusedLSTM on abcabC, abcdabcD.

After 'b' in abcabC comes 'c' or 'C', and which one depends on the text three characters back;
in abcdabcD the choice between 'd' and 'D' after 'c' depends on four characters back. A model
that cannot remember that far guesses 50:50 there and its loss stops at ln 2 times the share of
those positions (about 0.23 and 0.17). As in the lecture, each model (RNN(4,3) / LSTM(4,3) for
abcabC, RNN(5,4) / LSTM(5,4) for abcdabcD, then a Linear layer) trains with Adam at lr 0.1 from
several random starts, and each row shows one start: its loss at intervals, the next characters
it predicts for the last two periods, and how many of the c/C (d/D) choices it gets right.

The lecture trains 25 starts for 3000 epochs on 100 repeats of the text. nn.RNN takes about
70 microseconds per time step (forward and backward) on a CPU, which would make that almost two
hours, so the defaults are 6 starts (torch.manual_seed(43052 + k), the same seeds for both
models), 250 epochs and 10 repeats; `--runs 25 --steps 3000 --repeat 100` is the lecture's.

    python examples/rnn_vs_lstm.py [--quick] [--runs 6] [--steps 250] [--repeat 10]
"""

import math
import time

import torch

from fused_lstm import FusedLSTM

from _common import parse_args, text_data, train, water

TASKS = (("abcabC", 3), ("abcdabcD", 4))  # the text and the lecture's hidden size for it


def run(kind, seed, x, y, hidden_size, steps):
    """Train one start of one model; returns its losses and its predicted next characters."""
    torch.manual_seed(seed)
    n = x.shape[1]
    rnn = torch.nn.RNN(n, hidden_size) if kind == "RNN" else FusedLSTM(n, hidden_size)
    linr = torch.nn.Linear(hidden_size, n)
    loss_fn = torch.nn.CrossEntropyLoss()

    def compute_loss():
        hidden, _ = rnn(x, water(rnn))
        return loss_fn(linr(hidden), y)

    losses = train([*rnn.parameters(), *linr.parameters()], compute_loss, steps=steps, lr=0.1)
    with torch.no_grad():
        predicted = linr(rnn(x, water(rnn))[0]).argmax(1)
    return losses, predicted


def main(argv=None) -> dict:
    """Returns ``{pattern: {"RNN": [run, ...], "LSTM": [...]}}``, a run being a dict with
    ``seed``, ``losses`` and ``context_accuracy`` (the share of c/C or d/D choices right)."""

    def add_arguments(parser):
        parser.add_argument(
            "--runs", type=int, help="random starts per model (default 6, 1 with --quick)"
        )
        parser.add_argument(
            "--repeat",
            type=int,
            default=10,
            help="repeats of the text (default 10, the lecture's 100)",
        )

    args = parse_args(
        argv, __doc__, steps=250, quick_steps=40, prints=5, add_arguments=add_arguments
    )
    runs = args.runs or (1 if args.quick else 6)
    results = {}
    seconds = {"RNN": 0.0, "LSTM": 0.0}
    for pattern, hidden_size in TASKS:
        x, y, chars = text_data(pattern, args.repeat)
        spell = lambda indices: "".join(chars[k] for k in indices)  # noqa: E731
        target = y.argmax(1)
        # The positions whose answer needs the memory: the last letter, in either case.
        pair = [chars.index(pattern[-1].lower()), chars.index(pattern[-1])]
        context = (target == pair[0]) | (target == pair[1])
        floor = math.log(2) * context.float().mean().item()
        last = -2 * len(pattern)  # the lecture looks at the last period or two
        print(
            f"\n{pattern} x {args.repeat}: {len(x)} steps; without memory the loss stops at "
            f"{floor:.3f}; next characters of the last two periods: {spell(target[last:])}"
        )
        results[pattern] = {"RNN": [], "LSTM": []}
        for k in range(runs):
            for kind in ("RNN", "LSTM"):
                t0 = time.perf_counter()
                losses, predicted = run(kind, 43052 + k, x, y, hidden_size, args.steps)
                seconds[kind] += time.perf_counter() - t0
                accuracy = (predicted == target)[context].float().mean().item()
                results[pattern][kind].append(
                    {"seed": 43052 + k, "losses": losses, "context_accuracy": accuracy}
                )
                shown = " ".join(f"{loss:.3f}" for loss in [*losses[:: args.every], losses[-1]])
                print(
                    f"  {kind:4} seed {43052 + k}  loss {shown}  next {spell(predicted[last:])}"
                    f"  {pattern[-1].lower()}/{pattern[-1]} right {accuracy:4.0%}"
                )
        for kind in ("RNN", "LSTM"):
            learned = sum(r["context_accuracy"] == 1.0 for r in results[pattern][kind])
            print(f"  {kind:4} learned {pattern} in {learned} of {runs} runs")
    print(f"\ntraining time: nn.RNN {seconds['RNN']:.1f} s, FusedLSTM {seconds['LSTM']:.1f} s")
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # small models: a second thread only waits (README, Examples)
    main()

"""Seed 003's "LSTM은 왜 강한가?": an LSTM learns abaB; its gates drawn from gate_trace.

As in the lecture: 'abaB' * 100 one-hot, torch.manual_seed(43052), an LSTM with 2 hidden units
(here FusedLSTM(3, 2)), a Linear(2, 3) layer, Adam at lr 0.1 for 1000 epochs. After 'a' comes
'b' or 'B' depending on the 'a' before it, which the LSTM has to remember.

The lecture then recomputes i, f, g, o, c and h step by step in Python to draw them.
fused_lstm.gate_trace returns them as the fused kernel computed them, so this example draws
those: the last 8 steps as heatmaps (blue -1, white 0, red 1, the lecture's 'bwr' colours), in the
lecture's two pictures, the gates i, f, o (all between 0 and 1) and the states g, c, h with the
predicted probabilities of the next character. It also prints the lecture's t = 1 reading of the
cell update, c(t) = i * g + f * c(t-1). After 1000 epochs c at t = 0 is the lecture's
[0.3592, -0.9373]; later steps differ from the lecture's printouts because its loop reads
h[[t]] and cell[[t]] before writing them, so every one of its steps starts from zeros, while
gate_trace holds the recurrence as it ran.

    python examples/abab_gates.py [--quick] [--steps 1000] [--out examples/out]
"""

import pathlib

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fused_lstm import FusedLSTM, gate_trace  # noqa: E402

from _common import parse_args, text_data, train, water  # noqa: E402

TITLES = {
    "i": "i: input gate, how much of g enters c",
    "f": "f: forget gate, how much of c(t-1) stays",
    "o": "o: output gate, how much of tanh(c) shows in h",
    "g": "g: candidate, tanh of the new input and h(t-1)",
    "c": "c: cell state, f * c(t-1) + i * g (unbounded: the colours stop at -1 and 1)",
    "h": "h: hidden state, o * tanh(c)",
    "yhat": "yhat: softmax of Linear(h), the predicted next character",
}
PICTURES = {"abab_gates.png": ("i", "f", "o"), "abab_states.png": ("g", "c", "h", "yhat")}
LAST = 8  # the lecture looks at the last two periods


def draw(
    panels: dict,
    names: tuple,
    steps: list[int],
    inputs: list[str],
    chars: list[str],
    title: str,
    path: pathlib.Path,
) -> dict:
    """One heatmap per name, time along x (labelled with the input character), units along y.
    Returns what each heatmap shows, read back from the figure."""
    rows = [panels[name].shape[0] for name in names]
    fig, axes = plt.subplots(
        len(names),
        1,
        figsize=(9, 1.6 + 1.1 * sum(rows)),
        gridspec_kw={"height_ratios": rows},
        squeeze=False,
        layout="constrained",
    )
    fig.suptitle(title)
    shown = {}
    for ax, name in zip(axes[:, 0], names):
        values = panels[name].numpy()
        image = ax.imshow(values, cmap="bwr", vmin=-1, vmax=1, aspect="auto")
        for (unit, t), v in np.ndenumerate(values):
            ax.text(
                t,
                unit,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if abs(v) > 0.7 else "black",
            )
        ax.set_title(TITLES[name], fontsize=10, loc="left")
        ax.set_xticks(
            range(len(steps)), [f"t={t}\nx='{ch}'" for t, ch in zip(steps, inputs)], fontsize=8
        )
        if name == "yhat":
            ax.set_yticks(range(len(chars)), [f"'{ch}'" for ch in chars])
            ax.set_ylabel("next char")
        else:
            ax.set_yticks(range(values.shape[0]), [f"unit {u}" for u in range(values.shape[0])])
            ax.set_ylabel("hidden unit")
        # Keyed by the title the reader sees, not by the loop variable.
        drawn = torch.from_numpy(np.asarray(image.get_array()))
        shown[ax.get_title(loc="left").split(":")[0]] = drawn
    axes[-1, 0].set_xlabel("time step t, with its input character x_t")
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return shown


def main(argv=None) -> dict:
    """Returns ``losses``, ``trace`` (gate_trace's dict), ``model`` and ``linr``, ``x``, ``hx``,
    ``files`` (the PNGs) and ``shown`` (each heatmap's values, read back from its figure:
    ``shown[name][unit, k]`` is step ``len(x) - LAST + k``)."""

    def add_arguments(parser):
        parser.add_argument(
            "--out",
            type=pathlib.Path,
            default=pathlib.Path(__file__).resolve().parent / "out",
            help="folder for the PNGs (default: examples/out)",
        )

    args = parse_args(argv, __doc__, steps=1000, quick_steps=100, add_arguments=add_arguments)
    x, y, chars = text_data("abaB")
    torch.manual_seed(43052)
    lstm = FusedLSTM(3, 2)
    linr = torch.nn.Linear(2, 3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def compute_loss():
        hidden, _ = lstm(x, water(lstm))
        return loss_fn(linr(hidden), y)

    losses = train(
        [*lstm.parameters(), *linr.parameters()],
        compute_loss,
        steps=args.steps,
        lr=0.1,
        every=args.every,
    )

    hx = water(lstm)
    trace = gate_trace(lstm, x, hx)  # each (num_layers, T, hidden_size) = (1, 399, 2)
    with torch.no_grad():
        yhat = torch.softmax(linr(trace["h"][0]), dim=1)
    # One layer: drop the layer axis; units along rows, time along columns; the last 8 steps.
    panels = {name: trace[name][0, -LAST:].T for name in "ifgoch"}
    panels["yhat"] = yhat[-LAST:].T
    steps = list(range(len(x) - LAST, len(x)))
    inputs = [chars[k] for k in x[-LAST:].argmax(1)]

    i, f, g, c = (trace[name][0] for name in "ifgc")
    fmt = lambda v: "[" + ", ".join(f"{e:.4f}" for e in v.tolist()) + "]"  # noqa: E731
    print(
        f"t=1, input '{chars[x[1].argmax()]}': i={fmt(i[1])} g={fmt(g[1])} "
        f"f={fmt(f[1])} c(t-1)={fmt(c[0])}"
    )
    print(f"  i*g + f*c(t-1) = {fmt(i[1] * g[1] + f[1] * c[0])} = c(t) {fmt(c[1])}")

    args.out.mkdir(parents=True, exist_ok=True)
    files, shown = [], {}
    for filename, names in PICTURES.items():
        files.append(args.out / filename)
        title = (
            f"abaB, FusedLSTM(3, 2) after {args.steps} epochs: "
            f"{', '.join(names)} of the last {LAST} steps, from gate_trace"
        )
        shown.update(draw(panels, names, steps, inputs, chars, title, files[-1]))
        print(f"wrote {files[-1]}")
    return {
        "losses": losses,
        "trace": trace,
        "model": lstm,
        "linr": linr,
        "x": x,
        "hx": hx,
        "files": files,
        "shown": shown,
    }


if __name__ == "__main__":
    torch.set_num_threads(1)  # small models: a second thread only waits (README, Examples)
    main()

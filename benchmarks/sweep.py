"""A sweep between and around the named configurations: where is FusedLSTM faster than nn.LSTM?

    python benchmarks/sweep.py [--quick] [--only-cells] [--dtype NAME] [--reps N] [--out DIR]

On the CPU, FusedLSTM against nn.LSTM from the same weights at every T in (1, 35, 100),
B in (1, 4, 16, 64), H in (32, 128, 256, 512, 1024) with I = H, 1 and 2 layers; and
FusedLSTMCell against nn.LSTMCell, one step per call, stepped over 20 steps in a Python loop
(run.CellLoop), at B in (1, 8, 64, 256), H in (20, 64, 256, 512) with I = H. Each in float32,
float64 and bfloat16, training (forward + backward) and inference (no_grad). The figure is run.py's:
the median over interleaved repetitions of nn time / fused time (above 1: FusedLSTM faster).
Repetitions shrink with the work of a case (at most --reps, at least 1, and no warm-up for calls
of a second or so), so that the big cases do not take the whole run. Parity with nn.LSTM is
checked for every case, on a prefix of the sequence where the whole one would cost more than the
check is worth.

Writes sweep.md (a table of ratios per dtype and mode), sweep.json (every measurement) and
sweep.png (heatmaps of the ratios) into --out (default benchmarks/results/), prints a summary
(cases below 1.0x, the worst five) and exits with status 1 if any case fails its parity check.
Ctrl-C stops it and writes the cases measured so far (status 130).
--quick (a reduced grid, 3 repetitions) takes under 3 minutes on 2 cores, the full sweep under 15.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import run  # noqa: E402

import fused_lstm  # noqa: E402


@dataclass(frozen=True)
class Grid:
    T: tuple[int, ...]
    B: tuple[int, ...]
    H: tuple[int, ...]
    layers: tuple[int, ...]
    cell_B: tuple[int, ...]
    cell_H: tuple[int, ...]
    cell_T: int = 20


FULL = Grid(
    T=(1, 35, 100),
    B=(1, 4, 16, 64),
    H=(32, 128, 256, 512, 1024),
    layers=(1, 2),
    cell_B=(1, 8, 64, 256),
    cell_H=(20, 64, 256, 512),
)
QUICK = Grid(T=(35,), B=(1, 16), H=(32, 256, 1024), layers=(1,), cell_B=(1, 64), cell_H=(20, 256))
DTYPES = ("float32", "float64", "bfloat16")
MODES = {"train": run.train_step, "infer": run.infer_step}

# Multiply-adds (float32 equivalents) that a case's timed calls should add up to, per mode and
# implementation: a case of more work gets fewer repetitions, at least one. A case whose one
# call is more than this (a few tenths of a second and up) is not warmed up either: its
# first-call costs are lost in its time, and a warm-up would double the biggest cases' share
# of the run, which is most of it.
REP_WORK = 1 << 33
# Multiply-adds of one forward up to which parity is checked on the whole sequence; beyond it,
# on the longest prefix within it (at least 2 steps, so that the recurrence's backward counts).
PARITY_WORK = 1 << 27


def cases(grid: Grid, only_cells: bool) -> list[configs.Config]:
    lstm = (
        []
        if only_cells
        else [
            configs.Config(f"L{layers} T{T} B{B} H{H}", T, B, H, H, layers)
            for layers in grid.layers
            for T in grid.T
            for B in grid.B
            for H in grid.H
        ]
    )
    cell = [
        configs.Config(f"cell B{B} H{H}", grid.cell_T, B, H, H, cell=True)
        for B in grid.cell_B
        for H in grid.cell_H
    ]
    return lstm + cell


def work(cfg: configs.Config) -> int:
    """Multiply-adds of one forward: the four gates' products with the input and the state."""
    per_step = 4 * cfg.H * (cfg.I + cfg.H) + 4 * cfg.H * 2 * cfg.H * (cfg.layers - 1)
    return cfg.T * (cfg.B or 1) * per_step


def cost(cfg: configs.Config, mode: str, dtype: torch.dtype) -> int:
    """Estimated multiply-adds of one call in float32 equivalents: a training step is about
    three forwards' products, and float64 runs at about half the rate."""
    return work(cfg) * (3 if mode == "train" else 1) * (2 if dtype == torch.float64 else 1)


def plan(cfg: configs.Config, mode: str, dtype: torch.dtype, most: int) -> tuple[int, bool]:
    """(repetitions, whether to warm up) for a case."""
    c = max(cost(cfg, mode, dtype), 1)
    return max(1, min(most, REP_WORK // c)), c <= REP_WORK


def measure(cfg: configs.Config, dtype: torch.dtype, most_reps: int) -> dict:
    device = torch.device("cpu")
    ref, fused, x = run.make_case(cfg, device, dtype)
    steps = max(min(cfg.T, 2), min(cfg.T, PARITY_WORK * cfg.T // max(work(cfg), 1)))
    row = {
        "case": cfg.name,
        "kind": "cell" if cfg.cell else "lstm",
        "dtype": str(dtype).removeprefix("torch."),
        "T": cfg.T,
        "B": cfg.B,
        "I": cfg.I,
        "H": cfg.H,
        "layers": cfg.layers,
        "parity_T": steps,
        "parity": run.parity(ref, fused, x[:steps]),
    }
    impls = {"nn": lambda step, x: step(ref, x), "fused": lambda step, x: step(fused, x)}
    for mode, step in MODES.items():
        reps, warm_up = plan(cfg, mode, dtype, most_reps)
        times = run.time_mode(impls, step, x, reps, device, warm_up)
        row[mode] = {
            "nn_s": times["nn"],
            "fused_s": times["fused"],
            "reps": reps,
            "warm_up": warm_up,
            "ratio": times["nn"] / times["fused"],
        }
    return row


def ratio_table(rows: list[dict], mode: str, keys: tuple[str, ...], columns: list[int]) -> str:
    """Rows keyed by `keys`, one column per H, each cell a ratio (bold where it shows below
    1.00x)."""
    by_key: dict[tuple, dict[int, float]] = {}
    for r in rows:
        by_key.setdefault(tuple(r[k] for k in keys), {})[r["H"]] = r[mode]["ratio"]
    lines = [
        "| " + " | ".join(keys) + " | " + " | ".join(f"H={h}" for h in columns) + " |",
        "|---" * (len(keys) + len(columns)) + "|",
    ]
    for key, cells in by_key.items():
        shown = [
            (
                "-"
                if h not in cells
                else f"**{cells[h]:.2f}x**"
                if round(cells[h], 2) < 1
                else f"{cells[h]:.2f}x"
            )
            for h in columns
        ]
        lines.append("| " + " | ".join(map(str, key)) + " | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    parts = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for kind, keys, what in (
            ("lstm", ("layers", "T", "B"), "FusedLSTM / nn.LSTM, I = H"),
            ("cell", ("B",), "FusedLSTMCell / nn.LSTMCell stepped in a Python loop, I = H"),
        ):
            sel = [r for r in rows if r["dtype"] == dtype and r["kind"] == kind]
            if not sel:
                continue
            columns = sorted({r["H"] for r in sel})
            steps = f", {sel[0]['T']} steps" if kind == "cell" else ""
            for mode, name in (("train", "training (forward + backward)"), ("infer", "inference")):
                parts.append(
                    f"### {what}{steps}: {dtype}, {name}\n\n"
                    f"{ratio_table(sel, mode, keys, columns)}\n"
                )
    return "\n".join(parts)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm

    panels = []  # (kind, dtype, mode, row labels, column labels, matrix)
    for kind, keys in (("lstm", ("layers", "T", "B")), ("cell", ("B",))):
        for dtype in sorted({r["dtype"] for r in rows}):
            sel = [r for r in rows if r["dtype"] == dtype and r["kind"] == kind]
            if not sel:
                continue
            labels = list(dict.fromkeys(tuple(r[k] for k in keys) for r in sel))
            columns = sorted({r["H"] for r in sel})
            for mode in MODES:
                m = np.full((len(labels), len(columns)), np.nan)
                for r in sel:
                    m[labels.index(tuple(r[k] for k in keys)), columns.index(r["H"])] = r[mode][
                        "ratio"
                    ]
                names = [
                    " ".join(f"{'L' if k == 'layers' else k}={v}" for k, v in zip(keys, lab))
                    for lab in labels
                ]
                panels.append((kind, dtype, mode, names, columns, m))

    ratios = [r[mode]["ratio"] for r in rows for mode in MODES]
    span = max(2.0, max(max(ratios), 1 / min(ratios)))  # symmetric in log: 1.0x in the middle
    norm = LogNorm(vmin=1 / span, vmax=span)
    kinds = list(dict.fromkeys(p[0] for p in panels))
    per_kind = max(sum(p[0] == k for p in panels) for k in kinds)
    heights = [max(len(p[3]) for p in panels if p[0] == k) + 2 for k in kinds]
    fig, axes = plt.subplots(
        len(kinds),
        per_kind,
        squeeze=False,
        figsize=(3.3 * per_kind + 1.5, 0.28 * sum(heights) + 1.8),
        gridspec_kw={"height_ratios": heights},
    )
    for ax in axes.flat:
        ax.set_visible(False)
    for i, kind in enumerate(kinds):
        for ax, (_, dtype, mode, names, columns, m) in zip(
            axes[i], [p for p in panels if p[0] == kind]
        ):
            ax.set_visible(True)
            image = ax.imshow(m, cmap="RdBu", norm=norm, aspect="auto")
            for (y, x), v in np.ndenumerate(m):
                if not np.isnan(v):
                    dark = abs(np.log(v)) > 0.6 * np.log(span)
                    ax.text(
                        x,
                        y,
                        f"{v:.2f}",
                        ha="center",
                        va="center",
                        fontsize=6.5,
                        color="white" if dark else "black",
                    )
            ax.set_xticks(range(len(columns)), [f"H={h}" for h in columns], fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=6.5)
            what = "FusedLSTM" if kind == "lstm" else "FusedLSTMCell"
            ax.set_title(f"{what}, {dtype}, {mode}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    bar = fig.colorbar(image, cax=fig.add_axes((0.935, 0.1, 0.015, 0.8)))
    bar.set_label("nn time / fused time (log scale; above 1: fused faster)", fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def label(r: dict, mode: str) -> str:
    return f"{r['case']} {r['dtype']} {mode}"


def main(argv: list[str] | None = None, grid: Grid | None = None) -> int:
    """`grid` replaces the --quick / full grid (the tests pass a tiny one)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a reduced grid and 3 repetitions (under 3 minutes on 2 cores)",
    )
    parser.add_argument("--only-cells", action="store_true", help="the FusedLSTMCell cases only")
    parser.add_argument("--dtype", choices=DTYPES, help="one dtype only (default all)")
    parser.add_argument(
        "--reps",
        type=int,
        help="repetitions of the small cases (default 9, 3 with --quick); bigger cases get fewer",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    grid = grid or (QUICK if args.quick else FULL)
    most_reps = args.reps or (3 if args.quick else 9)
    todo = [
        (c, getattr(torch, d))
        for d in ((args.dtype,) if args.dtype else DTYPES)
        for c in cases(grid, args.only_cells)
    ]

    machine = run.machine_description(torch.device("cpu"))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python benchmarks/sweep.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    header = (
        f"{machine}; torch {torch.__version__}; native kernels: "
        f"{sorted(fused_lstm.native_backends()) or 'none'}; median of up to {most_reps} "
        f"interleaved repetitions (fewer for big cases); {stamp}"
    )
    print(header, file=sys.stderr, flush=True)

    start = time.perf_counter()
    progress = run.Progress(len(todo))
    rows = []
    try:
        for cfg, dtype in todo:
            progress.show(f"{cfg.name} {dtype}")
            r = measure(cfg, dtype, most_reps)
            rows.append(r)
            verdict = "" if r["parity"]["ok"] else ", PARITY FAILED"
            progress.advance(
                f"{cfg.name} {r['dtype']}: train {r['train']['ratio']:.2f}x, "
                f"infer {r['infer']['ratio']:.2f}x{verdict} "
                f"({time.perf_counter() - start:.0f}s)"
            )
    except KeyboardInterrupt:  # Ctrl-C (SIGINT) keeps the cases measured so far
        if not rows:
            raise
    progress.close()
    elapsed = time.perf_counter() - start
    if len(rows) < len(todo):
        header += f"; INTERRUPTED after {len(rows)} of {len(todo)} cases"

    measured = sorted((r[mode]["ratio"], label(r, mode)) for r in rows for mode in MODES)
    below = [m for m in measured if m[0] < 1.0]
    summary = f"{len(below)} of {len(measured)} ratios below 1.0x; worst: " + ", ".join(
        f"{name} {v:.2f}x" for v, name in measured[:5]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.md").write_text(
        f"# FusedLSTM vs nn.LSTM sweep, {stamp}\n\n{header}\n\nCommand: `{command}` "
        f"({elapsed:.0f} s)\n\nnn time / fused time: above 1.0x FusedLSTM is faster; below in "
        f"bold.\n\n{summary}\n\n{markdown(rows)}"
    )
    (args.out / "sweep.json").write_text(
        json.dumps(
            {
                "date": stamp,
                "machine": machine,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "native": sorted(fused_lstm.native_backends()),
                "command": command,
                "elapsed_s": elapsed,
                "cases_planned": len(todo),
                "most_reps": most_reps,
                "rep_work": REP_WORK,
                "parity_work": PARITY_WORK,
                "grid": asdict(grid),
                "rows": rows,
            },
            indent=1,
        )
    )
    plot(
        rows,
        f"FusedLSTM vs nn.LSTM: nn time / fused time. {machine}, torch "
        f"{torch.__version__}, {stamp}",
        args.out / "sweep.png",
    )
    print(summary, file=sys.stderr)
    print(
        f"wrote {args.out / 'sweep.md'}, sweep.json and sweep.png ({elapsed:.0f} s)",
        file=sys.stderr,
    )

    failed = [f"{r['case']} {r['dtype']}" for r in rows if not r["parity"]["ok"]]
    if failed:
        print(f"parity with nn.LSTM FAILED for {failed}", file=sys.stderr)
        return 1
    return 0 if len(rows) == len(todo) else 130


if __name__ == "__main__":
    sys.exit(main())

"""Where a training step's or an inference call's time goes, FusedLSTM beside nn.LSTM, from
torch.profiler: the table item 1 of a speed issue asks for before any change.

    python benchmarks/breakdown.py [--only NAME ...] [--dtype NAME] [--steps N]
    python benchmarks/breakdown.py --sweep results/sweep.json [--steps N]

For each run.py configuration (docs/benchmarks.md), or with --sweep for every case and mode of a
sweep.py run that came out below 1.0x, N profiled steps after a warm-up, split by the profiler's
self CPU time of each op into:

  step loops   what the kernel ops run themselves (fused_lstm::layer_forward / layer_backward /
               cell_*; nn.LSTM: its fused RNN ops, aten::mkldnn_rnn_layer and the like)
  products     the large GEMMs: aten::mm / addmm / bmm / linear's matmul, oneDNN's
               mkldnn::_linear_pointwise
  copies       aten::copy_ and the clones and contiguous calls around them
  allocation   aten::empty* / zeros / resize_
  other ATen   every other op (the pointwise ops around the products, sums, cat, ...)
  outside ops  wall time minus all of the above: Python, the module's checks, autograd's
               engine, the profiler's own cost

in milliseconds per step. --sweep prints one row per case and mode, FusedLSTM's split beside
nn.LSTM's, and the GFLOP/s of each one's step loops and products together: the forward's
multiply-adds (sweep.work; a training step counts three forwards) over the time of those two
categories, which for nn.LSTM in float32 is oneDNN's RNN primitive at that shape. The profiler
adds a few microseconds per op: read the small configurations' split as proportions, and time
them with run.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import run  # noqa: E402
import sweep  # noqa: E402

CATEGORIES = ["step loops", "products", "copies", "allocation", "other ATen", "outside ops"]
PRODUCTS = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::matmul",
    "aten::linear",
    "aten::mv",
    "aten::addmv",
    "aten::addmv_",
    "mkldnn::_linear_pointwise",
    "aten::_mkldnn_matmul",
    "aten::mkldnn_matmul",
}
COPIES = {"aten::copy_", "aten::clone", "aten::contiguous", "aten::_to_copy"}
ALLOCATION = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::zeros",
    "aten::zeros_like",
    "aten::resize_",
    "aten::new_empty",
    "aten::new_zeros",
}


def category(name: str) -> str:
    if name.startswith("fused_lstm::") or "rnn" in name or "lstm" in name:
        return "step loops"
    if name in PRODUCTS:
        return "products"
    if name in COPIES:
        return "copies"
    if name in ALLOCATION:
        return "allocation"
    return "other ATen"


def profile(module, step, x, steps: int) -> dict[str, float]:
    """Milliseconds per step in each category."""
    step(module, x)  # warm-up: allocations, oneDNN primitives
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step(module, x)
        wall = time.perf_counter() - t0
    split: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        split[category(event.key)] += event.self_cpu_time_total / 1e3
    split["outside ops"] = wall * 1e3 - sum(split.values())
    return {k: split[k] / steps for k in CATEGORIES} | {"total": wall * 1e3 / steps}


def markdown(rows: list[tuple[str, str, str, dict]]) -> str:
    lines = [
        "| config | dtype | mode | impl | " + " | ".join(CATEGORIES) + " | total ms |",
        "|---" * (len(CATEGORIES) + 5) + "|",
    ]
    for cfg, dtype, mode, splits in rows:
        for impl, s in splits.items():
            cells = " | ".join(f"{s[k]:.2f}" for k in CATEGORIES)
            lines.append(f"| {cfg} | {dtype} | {mode} | {impl} | {cells} | {s['total']:.2f} |")
    return "\n".join(lines)


def gflops(cfg: configs.Config, mode: str, split: dict[str, float]) -> float:
    """GFLOP/s of the step loops and products of one call (see the module's docstring)."""
    flops = 2 * sweep.work(cfg) * (3 if mode == "train" else 1)
    return flops / max(split["step loops"] + split["products"], 1e-6) / 1e6


def below(path: Path) -> list[tuple[configs.Config, str, str, float]]:
    """(config, dtype, mode, ratio) of every case and mode below 1.0x in a sweep.json."""
    found = []
    for r in json.loads(path.read_text())["rows"]:
        cfg = configs.Config(
            r["case"], r["T"], r["B"], r["I"], r["H"], r["layers"], cell=r["kind"] == "cell"
        )
        found += [
            (cfg, r["dtype"], mode, r[mode]["ratio"])
            for mode in sweep.MODES
            if r[mode]["ratio"] < 1.0
        ]
    return found


def sweep_markdown(rows: list[tuple[configs.Config, str, str, float, dict]]) -> str:
    short = ["loops", "products", "copies", "alloc", "other", "outside"]
    head = " | ".join(f"{impl} {k}" for impl in ("fused", "nn") for k in short + ["total"])
    lines = [
        f"| case | dtype | mode | ratio | {head} | fused GFLOP/s | nn GFLOP/s |",
        "|---" * (2 * len(short) + 8) + "|",
    ]
    for cfg, dtype, mode, ratio, splits in rows:
        cells = " | ".join(
            f"{splits[impl][k]:.2f}"
            for impl in ("FusedLSTM", "nn.LSTM")
            for k in CATEGORIES + ["total"]
        )
        lines.append(
            f"| {cfg.name} | {dtype} | {mode} | {ratio:.2f}x | {cells} | "
            f"{gflops(cfg, mode, splits['FusedLSTM']):.3g} | "
            f"{gflops(cfg, mode, splits['nn.LSTM']):.3g} |"
        )
    return "\n".join(lines)


def profile_sweep(path: Path, most_steps: int) -> str:
    rows = []
    for cfg, dtype_name, mode, ratio in below(path):
        dtype = getattr(torch, dtype_name)
        ref, fused, x = run.make_case(cfg, torch.device("cpu"), dtype)
        steps, _ = sweep.plan(cfg, mode, dtype, most_steps)
        step = sweep.MODES[mode]
        rows.append(
            (
                cfg,
                dtype_name,
                mode,
                ratio,
                {
                    "FusedLSTM": profile(fused, step, x, steps),
                    "nn.LSTM": profile(ref, step, x, steps),
                },
            )
        )
        print(f"{cfg.name} {dtype_name} {mode} done", file=sys.stderr, flush=True)
    return sweep_markdown(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="configuration names")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--steps", type=int, default=10, help="profiled steps per case (fewer for big sweep cases)"
    )
    parser.add_argument(
        "--sweep",
        type=Path,
        metavar="JSON",
        help="profile the cases below 1.0x of this sweep.py output instead",
    )
    args = parser.parse_args(argv)
    if args.sweep:
        print(
            f"{run.machine_description(torch.device('cpu'))}; torch {torch.__version__}; "
            f"ms per call from torch.profiler; the cases below 1.0x in {args.sweep}",
            flush=True,
        )
        print(profile_sweep(args.sweep, args.steps))
        return 0
    cfgs = [c for c in configs.CPU if not args.only or c.name in args.only]
    dtype = getattr(torch, args.dtype)
    print(
        f"{run.machine_description(torch.device('cpu'))}; torch {torch.__version__}; "
        f"self CPU time per step from torch.profiler, {args.steps} steps",
        flush=True,
    )
    rows = []
    for cfg in cfgs:
        ref, fused, x = run.make_case(cfg, torch.device("cpu"), dtype)
        for mode, step in (("train", run.train_step), ("infer", run.infer_step)):
            rows.append(
                (
                    cfg.name,
                    args.dtype,
                    mode,
                    {
                        "nn.LSTM": profile(ref, step, x, args.steps),
                        "FusedLSTM": profile(fused, step, x, args.steps),
                    },
                )
            )
            print(f"{cfg.name} {mode} done", file=sys.stderr, flush=True)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

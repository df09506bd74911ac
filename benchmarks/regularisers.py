"""What each regulariser costs: FusedLSTM training steps with one option on, against the same
FusedLSTM without it, in the same run.

    python benchmarks/regularisers.py [--reps N] [--only NAME ...] [--out DIR]

For each CPU configuration of configs.py named below (default: seed-tiny, small-batch and medium,
the issue's), times a training step (forward + backward) of FusedLSTM plain and with
recurrent_dropout, zoneout, weight_drop, or a reset every 50 steps in each batch row (the
masks are drawn inside every timed call, as in training), repetitions interleaved, median of
each; the figure is time with the option / time without it (at most 1.25 is the target).
Writes regularisers.md and regularisers.json into --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import run  # noqa: E402

OPTIONS = {
    "recurrent_dropout=0.25": {"recurrent_dropout": 0.25},
    "zoneout=0.1": {"zoneout": 0.1},
    "weight_drop=0.5": {"weight_drop": 0.5},
    "reset": {},
}
DEFAULT = ("seed-tiny", "small-batch", "medium")


def reset_for(x: torch.Tensor, every: int = 50) -> torch.Tensor:
    """Every batch row starts a new sequence every `every` steps, rows staggered."""
    T = x.shape[0]
    lead = x.shape[:-1]
    steps = torch.arange(T).view(T, *([1] * (len(lead) - 1)))
    rows = torch.arange(lead[1]).view(1, -1) if len(lead) == 2 else 0
    return ((steps + 7 * rows) % every == 0).expand(lead).contiguous()


def train_step_with(reset):
    def step(module, x):
        x = x.detach().requires_grad_()
        out, _ = module(x, reset=reset)
        out.sum().backward()
        for p in module.parameters():
            p.grad = None

    return step


def measure(cfg: configs.Config, reps: int) -> dict:
    _, plain, x = run.make_case(cfg, torch.device("cpu"), torch.float32)
    with_options = {}
    for name, kwargs in OPTIONS.items():
        module = type(plain)(cfg.I, cfg.H, cfg.layers, **kwargs)
        module.load_state_dict(plain.state_dict())
        with_options[name] = module
    reset = reset_for(x)
    impls = {"plain": lambda step, x: run.train_step(plain, x)}
    for name, module in with_options.items():
        step = train_step_with(reset if name == "reset" else None)
        impls[name] = lambda _, x, step=step, module=module: step(module, x)
    times = run.time_mode(impls, None, x, reps, torch.device("cpu"))
    return {
        "config": cfg.name,
        "plain_s": times["plain"],
        "ratios": {name: times[name] / times["plain"] for name in OPTIONS},
    }


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| configuration | plain step (ms) | " + " | ".join(OPTIONS) + " |",
        "|---|---|" + "---|" * len(OPTIONS),
    ]
    for r in rows:
        cells = " | ".join(f"{r['ratios'][name]:.2f}x" for name in OPTIONS)
        lines.append(f"| {r['config']} | {r['plain_s'] * 1e3:.2f} | {cells} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", nargs="+", metavar="NAME", default=list(DEFAULT))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    by_name = {c.name: c for c in configs.CPU if not c.cell}
    unknown = set(args.only) - set(by_name)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {list(by_name)}")
    header = (
        f"{run.machine_description(torch.device('cpu'))}; torch {torch.__version__}; "
        f"median of {args.reps} interleaved training steps; time with / time without"
    )
    print(header, flush=True)
    rows = [measure(by_name[name], args.reps) for name in args.only]
    table = markdown_table(rows)
    print(table)
    command = "python benchmarks/regularisers.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "regularisers.md").write_text(f"{header}\n\nCommand: `{command}`\n\n{table}\n")
    (args.out / "regularisers.json").write_text(
        json.dumps({"header": header, "command": command, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU ops alone, without modules or autograd: where the kernels' own time goes.

    python benchmarks/ops.py [--only NAME ...] [--reps N] [--calls N]

One thread, one layer, one direction of each CPU configuration of configs.py (B=None runs as a
batch of one). Times `torch.ops.fused_lstm.layer_forward` and `layer_backward` over the whole
sequence and `layer_forward` on one step (the fixed cost per call, which every FusedLSTMCell step
pays). Each figure is the minimum of --reps calls of `time.thread_time`: the machine's noise only
ever adds time, and the other core's load does not count.

--calls N runs N forward + backward pairs of each configuration and prints nothing: the
difference of two `valgrind --tool=callgrind` runs with different N counts the instructions of
N calls.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402

import fused_lstm  # noqa: E402, F401  (registers torch.ops.fused_lstm)

OPS = torch.ops.fused_lstm


def make_args(cfg: configs.Config, T: int):
    torch.manual_seed(0)
    B = cfg.B or 1
    lstm = torch.nn.LSTM(cfg.I, cfg.H)
    w = [p.detach() for p in lstm.parameters()]
    x, h0, c0 = torch.randn(T, B, cfg.I), torch.zeros(B, cfg.H), torch.zeros(B, cfg.H)
    fwd = (x, None, h0, c0, *w, None, False)
    y, _, _, gates, cells = OPS.layer_forward(*fwd)
    bwd = (
        torch.randn_like(y),
        None,
        None,
        x,
        None,
        h0,
        c0,
        w[0],
        w[1],
        None,
        y,
        gates,
        cells,
        False,
    )
    return fwd, bwd


def fastest(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--calls", type=int)
    args = parser.parse_args(argv)
    cpu = {c.name: c for c in configs.CPU if not c.cell}
    unknown = set(args.only or ()) - set(cpu)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; CPU layers: {sorted(cpu)}")
    torch.set_num_threads(1)
    with torch.no_grad():
        for name in args.only or cpu:
            fwd, bwd = make_args(cpu[name], cpu[name].T)
            if args.calls is not None:
                for _ in range(args.calls):
                    OPS.layer_forward(*fwd)
                    OPS.layer_backward(*bwd)
                continue
            one_step, _ = make_args(cpu[name], 1)
            reps = args.reps if cpu[name].H < 256 else max(1, args.reps // 4)  # the big ones
            print(
                f"{name:12s} forward {fastest(lambda: OPS.layer_forward(*fwd), reps):9.3f} ms"
                f"  backward {fastest(lambda: OPS.layer_backward(*bwd), reps):9.3f} ms"
                f"  one step {fastest(lambda: OPS.layer_forward(*one_step), reps) * 1e3:6.1f} us",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

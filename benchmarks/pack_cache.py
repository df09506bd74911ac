"""What the CPU's cache of packed weights saves a call: per-call times of FusedLSTM with the cache
on and off, each against nn.LSTM timed beside it, at policy-like shapes (one step a call, the
state carried) and at run.py's configurations.

    python benchmarks/pack_cache.py [--reps N] [--threads N] [--policy-only] [--only NAME ...]

Uses fused_lstm._C.pack_cache_set_capacity (csrc/python/module.cpp). Each repetition times nn.LSTM and
FusedLSTM with the cache on, then both with it off (capacity 0: today's path, every pack built
at every call, a one-step call reading W in place), so that drift in machine load hits both
alike; each figure is the median over --reps of torch.utils.benchmark's blocked_autorange, and
the spread is the lowest and highest of the repetitions. The ratio is nn.LSTM / FusedLSTM: above
1, FusedLSTM is faster.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402
import run as run_py  # noqa: E402

import fused_lstm  # noqa: E402

# (name, T, B, I, H): a policy stepping one call at a time, its state carried between calls.
POLICY = [
    ("policy-T1-B1-H256", 1, 1, 256, 256),
    ("policy-T1-B16-H128", 1, 16, 128, 128),
    ("policy-T8-B16-H128", 8, 16, 128, 128),
]


def policy_case(T, B, I, H):
    ref = torch.nn.LSTM(I, H)
    fused = fused_lstm.FusedLSTM.from_lstm(ref)
    x = torch.randn(T, B, I)
    hx = (torch.randn(1, B, H), torch.randn(1, B, H))

    def infer(module):
        with torch.no_grad():
            module(x, hx)

    return {"infer": (lambda: infer(ref), lambda: infer(fused))}


def config_case(cfg):
    ref, fused, x = run_py.make_case(cfg, torch.device("cpu"), torch.float32)
    return {
        mode: (lambda s=step: s(ref, x), lambda s=step: s(fused, x))
        for mode, step in (("infer", run_py.infer_step), ("train", run_py.train_step))
    }


def time_us(fn) -> float:
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median * 1e6


def measure(ref_fn, fused_fn, reps, capacity):
    times = {k: [] for k in ("nn on", "on", "nn off", "off")}
    for _ in range(reps):
        for state, cap in (("on", capacity), ("off", 0)):
            fused_lstm._C.pack_cache_set_capacity(cap)
            fused_fn()
            fused_fn()
            fused_fn()  # the third call runs from the stored packs
            times["nn " + state].append(time_us(ref_fn))
            times[state].append(time_us(fused_fn))
    fused_lstm._C.pack_cache_set_capacity(capacity)
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--policy-only", action="store_true")
    parser.add_argument("--only", nargs="+", metavar="NAME")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    capacity = fused_lstm._C.pack_cache_stats()["capacity"]
    cases = [(name, policy_case(*dims)) for name, *dims in POLICY]
    if not args.policy_only:
        cases += [(cfg.name, None) for cfg in configs.CPU]
    if args.only:
        cases = [c for c in cases if c[0] in args.only]
    print(f"threads {torch.get_num_threads()}, reps {args.reps}, capacity {capacity}")
    print(
        f"{'case':<22}{'mode':<7}{'nn us':>10}{'on us':>10}{'off us':>10}"
        f"{'ratio on':>10}{'ratio off':>10}{'on/off':>8}  spread on / off (us)"
    )
    for name, modes in cases:
        if modes is None:
            modes = config_case(next(c for c in configs.CPU if c.name == name))
        for mode, (ref_fn, fused_fn) in modes.items():
            t = measure(ref_fn, fused_fn, args.reps, capacity)
            med = {k: statistics.median(v) for k, v in t.items()}
            print(
                f"{name:<22}{mode:<7}{med['nn on']:>10.1f}{med['on']:>10.1f}{med['off']:>10.1f}"
                f"{med['nn on'] / med['on']:>10.2f}{med['nn off'] / med['off']:>10.2f}"
                f"{med['on'] / med['off']:>8.2f}  {min(t['on']):.1f}-{max(t['on']):.1f} / "
                f"{min(t['off']):.1f}-{max(t['off']):.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

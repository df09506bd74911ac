"""FusedLSTM against nn.LSTM (oneDNN/ATen on the CPU, cuDNN on a GPU) and against the pure-PyTorch
reference, same weights, same run, interleaved repetitions, median ratios.

    python benchmarks/compare.py [--device cpu|cuda] [--dtype float32] [--reps 7] [--only NAME]

Prints a markdown table: per configuration, training step (forward + backward) and inference
(no_grad) times, the ratio nn.LSTM time / FusedLSTM time (above 1 means FusedLSTM is faster),
and the bytes each implementation saves for the backward pass of a training step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402

import fused_lstm  # noqa: E402
from fused_lstm import FusedLSTM  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_case(cfg, device, dtype):
    torch.manual_seed(0)
    ref = torch.nn.LSTM(cfg.I, cfg.H, cfg.layers, device=device, dtype=dtype)
    fused = FusedLSTM.from_lstm(ref)
    shape = (cfg.T, cfg.I) if cfg.B is None else (cfg.T, cfg.B, cfg.I)
    x = torch.randn(shape, device=device, dtype=dtype)
    return ref, fused, x


def train_step(module, x):
    x = x.detach().requires_grad_()
    out, (h, c) = module(x)
    out.sum().backward()
    for p in module.parameters():
        p.grad = None


def infer_step(module, x):
    with torch.no_grad():
        module(x)


def saved_bytes(module, x):
    """Bytes of the tensors autograd keeps for the backward of one training step."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = x.detach().requires_grad_()
        out, _ = module(x)
    out.sum().backward()
    return total


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def measure(cfg, device, dtype, reps, with_reference):
    ref, fused, x = make_case(cfg, device, dtype)
    impls = {"nn.LSTM": lambda f: f(ref, x), "FusedLSTM": lambda f: f(fused, x)}
    if with_reference:
        def run_reference(f):
            with fused_lstm.reference_only():
                f(fused, x)
        impls["reference"] = run_reference
    row = {}
    for mode, step in (("train", train_step), ("infer", infer_step)):
        times = {name: [] for name in impls}
        for name, run in impls.items():  # warm-up
            run(step)
        for _ in range(reps):  # interleaved, so drift in machine load hits all alike
            for name, run in impls.items():
                times[name].append(timed(lambda: run(step), device))
        row[mode] = {name: statistics.median(ts) for name, ts in times.items()}
    row["saved"] = {"nn.LSTM": saved_bytes(ref, x), "FusedLSTM": saved_bytes(fused, x)}
    return row


def fmt_ms(s):
    return f"{s * 1e3:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--only", action="append", help="configuration name (repeatable)")
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfgs = configs.GPU if device.type == "cuda" else configs.CPU
    if args.only:
        cfgs = [c for c in cfgs if c.name in args.only]

    print(f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"threads: {torch.get_num_threads()}, dtype: {args.dtype}, torch {torch.__version__}, "
          f"native: {sorted(fused_lstm.native_backends())}, median of {args.reps}")
    print()
    print("| config | T | B | I | H | L | train nn.LSTM ms | train Fused ms | **train ratio** | "
          "train ref ms | infer nn.LSTM ms | infer Fused ms | **infer ratio** | "
          "saved MB nn.LSTM | saved MB Fused |")
    print("|---" * 15 + "|")
    for cfg in cfgs:
        small = cfg.H <= 64 and device.type == "cpu"
        r = measure(cfg, device, dtype, args.reps, with_reference=small)
        tr, inf, sv = r["train"], r["infer"], r["saved"]
        print(f"| {cfg.name} | {cfg.T} | {cfg.B or '-'} | {cfg.I} | {cfg.H} | {cfg.layers} | "
              f"{fmt_ms(tr['nn.LSTM'])} | {fmt_ms(tr['FusedLSTM'])} | "
              f"**{tr['nn.LSTM'] / tr['FusedLSTM']:.2f}x** | "
              f"{fmt_ms(tr['reference']) if 'reference' in tr else '-'} | "
              f"{fmt_ms(inf['nn.LSTM'])} | {fmt_ms(inf['FusedLSTM'])} | "
              f"**{inf['nn.LSTM'] / inf['FusedLSTM']:.2f}x** | "
              f"{sv['nn.LSTM'] / 2**20:.2f} | {sv['FusedLSTM'] / 2**20:.2f} |", flush=True)


if __name__ == "__main__":
    main()

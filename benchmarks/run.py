"""The main job: is FusedLSTM right here, and is it faster than nn.LSTM on this machine?

    python benchmarks/run.py [--quick] [--out DIR] [--device cpu|cuda] [--dtype NAME]
                             [--reps N] [--only NAME ...]

For each configuration of docs/benchmarks.md for the device (CUDA when a GPU is visible, else the
CPU): first parity with nn.LSTM from the same weights (the largest absolute difference of the
outputs and of all gradients), then timings of a training step (forward + backward) and of
inference (no_grad) for nn.LSTM (cuDNN / oneDNN), FusedLSTM and, on the small CPU configurations,
the pure-PyTorch reference. Repetitions are interleaved so that drift in machine load hits every
implementation alike; each figure is the median. The ratio is nn.LSTM time / FusedLSTM time: above
1, FusedLSTM is faster. In the cell configurations (cell-*) "nn.LSTM" and "FusedLSTM" are
nn.LSTMCell and FusedLSTMCell stepped over the sequence in a Python loop.

On a GPU, both run with TF32 off, since FusedLSTM's kernels compute in full float32; in float32,
nn.LSTM is also timed with TF32 on ("nn.LSTM TF32"), which is what cuDNN does by default. Times
come from CUDA events, and each is given with the cost of one step: the slope between the whole
sequence and its first half.

Writes results.md, results.json and results.png into --out (default benchmarks/results/) and
exits with status 1 if any configuration fails its parity check.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import configs  # noqa: E402

import fused_lstm  # noqa: E402
from fused_lstm import FusedLSTM, FusedLSTMCell  # noqa: E402

# Largest |FusedLSTM - nn.LSTM| allowed, relative to the largest |nn.LSTM| value (at least 1).
# float32 gradients summed over thousands of steps differ in the last few bits per step.
PARITY_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 5e-2}


class Progress:
    """A one-line progress bar on stderr (no dependency for a bar)."""

    def __init__(self, total: int, width: int = 30) -> None:
        self.total, self.done, self.width = total, 0, width
        self.start = time.perf_counter()

    def show(self, label: str) -> None:
        if not sys.stderr.isatty():  # a log gets one line per finished part, not a redrawn bar
            return
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        print(
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
            f"{elapsed:5.0f}s  {label:<42.42}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def advance(self, label: str) -> None:
        self.done += 1
        if sys.stderr.isatty():
            self.show(label)
        else:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


class CellLoop(torch.nn.Module):
    """A cell stepped over a time-major sequence in a Python loop, as a model built from
    nn.LSTMCell runs it. Returns what nn.LSTM returns, (every h, (last h, last c)), so a cell
    configuration is checked and timed like the others."""

    def __init__(self, cell: torch.nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x):
        hx, hs = None, []
        for x_t in x.unbind(0):
            hx = self.cell(x_t, hx)
            hs.append(hx[0])
        return torch.stack(hs), hx


def make_case(cfg: configs.Config, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    if cfg.cell:
        cell = torch.nn.LSTMCell(cfg.I, cfg.H, device=device, dtype=dtype)
        ref, fused = CellLoop(cell), CellLoop(FusedLSTMCell.from_lstm_cell(cell))
    else:
        ref = torch.nn.LSTM(cfg.I, cfg.H, cfg.layers, device=device, dtype=dtype)
        fused = FusedLSTM.from_lstm(ref)
    shape = (cfg.T, cfg.I) if cfg.B is None else (cfg.T, cfg.B, cfg.I)
    return ref, fused, torch.randn(shape, device=device, dtype=dtype)


def parity(ref, fused, x) -> dict[str, float | bool]:
    """Max abs differences of (output, h_n, c_n) and of (grad input, grad every parameter) from
    nn.LSTM's. In float16 and bfloat16, where nn.LSTM's own error can be far above any fixed
    tolerance (oneDNN's bfloat16 backward at H = 1024: weight gradients off by half their scale),
    FusedLSTM passes within twice nn.LSTM's error, both measured against float64 from the same
    rounded weights and input: the tests' rule for low precision."""
    # A loss that weights every output differently, so that swapped rows or units would show.
    torch.manual_seed(1)
    weight = None

    def run(module, x):
        nonlocal weight
        xi = x.detach().requires_grad_()
        out, (h, c) = module(xi)
        if weight is None:
            weight = torch.randn_like(out)
        loss = (out * weight.to(out.dtype)).sum() + h.sum() + c.sum()
        grads = torch.autograd.grad(loss, [xi, *module.parameters()])
        return [out, h, c], list(grads)

    def max_diff(want, got):
        return max((a.double() - b.double()).abs().max().item() for a, b in zip(want, got))

    (vals_ref, grads_ref), (vals, grads) = run(ref, x), run(fused, x)
    exact = None
    if x.dtype in (torch.float16, torch.bfloat16):
        exact = dict(zip(("out", "grad"), run(copy.deepcopy(ref).double(), x.double())))
    result = {}
    for kind, want, got in (("out", vals_ref, vals), ("grad", grads_ref, grads)):
        scale = max(1.0, max(a.double().abs().max().item() for a in want))
        result[kind] = max_diff(want, got)
        allowed = PARITY_TOL[x.dtype] * scale
        if exact is None:
            result[f"{kind}_ok"] = result[kind] <= allowed
        else:
            own = max_diff(exact[kind], want)
            result[f"{kind}_ok"] = max_diff(exact[kind], got) <= max(2 * own, allowed)
    result["ok"] = result["out_ok"] and result["grad_ok"]
    return result


def train_step(module, x) -> None:
    x = x.detach().requires_grad_()
    out, (h, c) = module(x)
    out.sum().backward()
    for p in module.parameters():
        p.grad = None


def infer_step(module, x) -> None:
    with torch.no_grad():
        module(x)


def saved_bytes(module, x) -> int:
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
        out, _ = module(x.detach().requires_grad_())
    out.sum().backward()
    return total


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        # Events time the GPU's work from the stream itself; the synchronisation before them
        # leaves no earlier work queued inside the interval.
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@contextlib.contextmanager
def tf32(enabled: bool):
    """Both TF32 switches, the caller's restored on exit: cuDNN's governs all of nn.LSTM's
    products, cuBLAS's FusedLSTM's input projection (its own kernels compute in full float32
    whatever the switches say)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# The key of an implementation's timing on the first half of the sequence (time_mode's dict).
HALF = " on T/2"


def per_step(whole: float, half: float, T: int) -> float:
    """Seconds per step: the slope between T and T // 2 steps. What every call pays once
    (launches before the loop, allocation, the Python around the call) cancels out; the input
    projection, which grows with T, stays in."""
    return (whole - half) / (T - T // 2)


def time_mode(
    impls: dict, step, x, reps: int, device: torch.device, warm_up: bool = True
) -> dict[str, float]:
    """Median of `reps` interleaved timings of each implementation. warm_up=False is for calls
    of seconds, where the first call's extra costs are lost in the noise but a warm-up would
    double the time taken."""
    if warm_up:  # first-call allocations, oneDNN primitive creation
        for run in impls.values():
            run(step, x)
    times = {name: [] for name in impls}
    for _ in range(reps):
        for name, run in impls.items():
            times[name].append(timed(lambda: run(step, x), device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def measure(cfg, device, dtype, reps, with_reference, progress, gpu_rows=False) -> dict:
    """One configuration's row. gpu_rows (on a GPU) adds nn.LSTM with TF32 on in float32 and the
    per-step slopes, and runs everything else with TF32 off."""
    with tf32(False) if gpu_rows else contextlib.nullcontext():
        return _measure(cfg, device, dtype, reps, with_reference, progress, gpu_rows)


def _measure(cfg, device, dtype, reps, with_reference, progress, gpu_rows) -> dict:
    ref, fused, x = make_case(cfg, device, dtype)
    label = f"{cfg.name} {str(dtype).removeprefix('torch.')}"
    progress.show(f"{label}: parity")
    row = {
        "config": cfg.name,
        "dtype": str(dtype).removeprefix("torch."),
        "T": cfg.T,
        "B": cfg.B,
        "I": cfg.I,
        "H": cfg.H,
        "layers": cfg.layers,
        "parity": parity(ref, fused, x),
    }
    progress.advance(f"{label}: parity {'ok' if row['parity']['ok'] else 'FAILED'}")

    def run_reference(step, x):
        with fused_lstm.reference_only():
            step(fused, x)

    def run_tf32(step, x):
        with tf32(True):
            step(ref, x)

    impls = {"nn.LSTM": lambda step, x: step(ref, x), "FusedLSTM": lambda step, x: step(fused, x)}
    if gpu_rows and dtype == torch.float32:
        impls["nn.LSTM TF32"] = run_tf32
    if with_reference:
        impls["reference"] = run_reference
    if gpu_rows:
        # Both lengths in the same interleaved repetitions, so that a slope is not a drift.
        x_half = x[: cfg.T // 2]
        impls |= {
            name + HALF: lambda step, _, run=run: run(step, x_half) for name, run in impls.items()
        }
        row["per_step"] = {}
    for mode, step in (("train", train_step), ("infer", infer_step)):
        progress.show(f"{label}: timing {mode}")
        times = time_mode(impls, step, x, reps, device)
        row[mode] = {name: t for name, t in times.items() if not name.endswith(HALF)}
        if gpu_rows:
            row["per_step"][mode] = {
                name: per_step(t, times[name + HALF], cfg.T) for name, t in row[mode].items()
            }
        progress.advance(f"{label}: {mode} {ratio(row[mode]):.2f}x")
    row["saved_bytes"] = {"nn.LSTM": saved_bytes(ref, x), "FusedLSTM": saved_bytes(fused, x)}
    return row


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {torch.get_num_threads()} threads"


def ratio(mode: dict) -> float:
    return mode["nn.LSTM"] / mode["FusedLSTM"]


def mode_columns(mode: str, gpu: bool) -> list[tuple[str, object]]:
    """(heading, cell of a row) for one mode's times. On a GPU, nn.LSTM twice (the ratio is
    against TF32 off, as FusedLSTM runs) and the per-step slopes; on the CPU, the reference."""

    def ms(name):
        return lambda r: f"{r[mode][name] * 1e3:.2f}" if name in r[mode] else "-"

    def us(name):
        return lambda r: f"{r['per_step'][mode][name] * 1e6:.1f}"

    def bold_ratio(r):
        return f"**{ratio(r[mode]):.2f}x**"

    if not gpu:
        return [
            (f"{mode} nn.LSTM ms", ms("nn.LSTM")),
            (f"{mode} Fused ms", ms("FusedLSTM")),
            (f"**{mode} ratio**", bold_ratio),
        ] + ([(f"{mode} ref ms", ms("reference"))] if mode == "train" else [])
    return [
        (f"{mode} nn.LSTM ms TF32 off", ms("nn.LSTM")),
        (f"{mode} nn.LSTM ms TF32 on", ms("nn.LSTM TF32")),
        (f"{mode} Fused ms", ms("FusedLSTM")),
        (f"**{mode} ratio** vs TF32 off", bold_ratio),
        (f"{mode} nn.LSTM µs/step TF32 off", us("nn.LSTM")),
        (f"{mode} Fused µs/step", us("FusedLSTM")),
    ]


def markdown_table(rows: list[dict]) -> str:
    """The CPU's table, or the GPU's (rows from measure(gpu_rows=True), which have per_step)."""
    gpu = any("per_step" in r for r in rows)

    def mb(name):
        return lambda r: f"{r['saved_bytes'][name] / 2**20:.2f}"

    def parity_cell(r):
        p = r["parity"]
        return f"{p['out']:.1e} / {p['grad']:.1e} {'ok' if p['ok'] else '**FAILED**'}"

    columns = [
        ("config", lambda r: r["config"]),
        ("dtype", lambda r: r["dtype"]),
        ("T", lambda r: r["T"]),
        ("B", lambda r: r["B"] or "-"),
        ("I", lambda r: r["I"]),
        ("H", lambda r: r["H"]),
        ("L", lambda r: r["layers"]),
        ("parity out / grad max abs diff", parity_cell),
        *mode_columns("train", gpu),
        *mode_columns("infer", gpu),
        ("saved MB nn.LSTM", mb("nn.LSTM")),
        ("saved MB Fused", mb("FusedLSTM")),
    ]
    lines = [
        "| " + " | ".join(heading for heading, _ in columns) + " |",
        "|---" * len(columns) + "|",
    ]
    lines += ["| " + " | ".join(str(cell(r)) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    labels = [
        r["config"] if r["dtype"] == "float32" else f"{r['config']}\n{r['dtype']}" for r in rows
    ]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    for offset, mode, color in ((-0.2, "train", "tab:blue"), (0.2, "infer", "tab:orange")):
        values = [ratio(r[mode]) for r in rows]
        bars = ax.bar(
            [x + offset for x in xs],
            values,
            0.4,
            color=color,
            label="training (fwd + bwd)" if mode == "train" else "inference",
        )
        ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=8, padding=2)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--")
    ax.text(len(rows) - 0.5, 1.0, " nn.LSTM", va="bottom", ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("speed-up: nn.LSTM time / FusedLSTM time")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", help="run every configuration in this dtype only")
    parser.add_argument("--reps", type=int, help="timed repetitions (default 7, 3 with --quick)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, for a first look (under 2 minutes on 2 cores)",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="configuration names")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (3 if args.quick else 7)
    gpu = device.type == "cuda"
    cfgs = configs.GPU if gpu else configs.CPU
    if args.only:
        unknown = set(args.only) - {c.name for c in cfgs}
        if unknown:
            parser.error(
                f"unknown configuration(s) {sorted(unknown)} for {device.type}; "
                f"choose from {[c.name for c in cfgs]}"
            )
        cfgs = [c for c in cfgs if c.name in args.only]
    cases = [
        (c, getattr(torch, d)) for c in cfgs for d in ((args.dtype,) if args.dtype else c.dtypes)
    ]

    machine = machine_description(device)
    native = sorted(fused_lstm.native_backends())
    header = (
        f"device: {device} ({machine}); torch {torch.__version__}; native kernels: "
        f"{native or 'none'}; median of {reps} interleaved repetitions"
    )
    if gpu:
        header += (
            "; TF32 off (torch.backends.cudnn.allow_tf32 and "
            "torch.backends.cuda.matmul.allow_tf32 False) but in the nn.LSTM columns "
            "marked TF32 on; times from CUDA events; µs/step: the slope between T and T/2"
        )
    print(header, flush=True)
    if device.type not in native:
        print(
            f"warning: no native kernel for {device.type} in this install: FusedLSTM runs on "
            "the pure-PyTorch reference",
            file=sys.stderr,
        )

    progress = Progress(3 * len(cases))
    rows = []
    for cfg, dtype in cases:
        # The reference is a Python loop per step: time it only where that takes seconds, not
        # minutes.
        with_reference = device.type == "cpu" and cfg.H <= 64
        rows.append(measure(cfg, device, dtype, reps, with_reference, progress, gpu))
    progress.close()

    table = markdown_table(rows)
    print(table)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    command = "python benchmarks/run.py" + "".join(
        f" {shlex.quote(a)}" for a in (argv or sys.argv[1:])
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(
        f"# FusedLSTM vs nn.LSTM, {stamp}\n\n{header}\n\nCommand: `{command}`\n\n{table}\n"
    )
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "date": stamp,
                "device": str(device),
                "machine": machine,
                "torch": torch.__version__,
                "native": native,
                "reps": reps,
                "command": command,
                "rows": rows,
            },
            indent=1,
        )
    )
    try:
        plot(rows, f"FusedLSTM vs nn.LSTM, {machine}, {stamp}", args.out / "results.png")
        print(f"wrote {args.out / 'results.md'}, results.json and results.png")
    except ModuleNotFoundError as e:  # a GPU machine lent bare: the figures matter, not the plot
        print(
            f"wrote {args.out / 'results.md'} and results.json; no results.png: {e}",
            file=sys.stderr,
        )

    failed = [r["config"] for r in rows if not r["parity"]["ok"]]
    if failed:
        print(f"parity with nn.LSTM FAILED for {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What nvcc makes of the CUDA step kernels, read without a GPU: registers, spills and shared
memory per kernel (ptxas -v), and the global loads of each step kernel's SASS by width.

    python benchmarks/cuda_resources.py [--arch sm_90] [--filter step_kernel] [--sass DIR]
                                        [--files GLOB]

Compiles every .cu file under csrc/cuda/ to a cubin with the flags setup.py gives nvcc (CUDA_HOME,
default /usr/local/cuda) and prints one row per kernel. --sass DIR also writes each cubin's SASS
there.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
# triton, which torch installs, bundles a cuobjdump (a minimal CUDA toolkit has none).
CUOBJDUMP = Path(torch.__file__).parent.parent / "triton/backends/nvidia/bin/cuobjdump"


def nvcc_command(src: Path, out: Path, arch: str) -> list[str]:
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    site = Path(torch.__file__).parent.parent
    incs = [f"-I{p}" for p in cpp_extension.include_paths()]
    incs += [
        f
        for d in sorted(glob.glob(str(site / "nvidia" / "*" / "include")))
        for f in ("-isystem", d)
    ]
    incs.append(f"-I{sysconfig.get_paths()['include']}")
    return [
        f"{cuda_home}/bin/nvcc",
        "-std=c++20",
        "-O3",
        "-cubin",
        f"-arch={arch}",
        "-Xptxas",
        "-v",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr",
        *incs,
        str(src),
        "-o",
        str(out),
    ]


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, out.stdout.splitlines()))


def short(name: str) -> str:
    name = re.sub(r"\(anonymous namespace\)::|fused_lstm::|c10::|cuda_work::", "", name)
    name = name.replace("BFloat16", "bf16").replace("Half", "f16")
    return re.sub(r"\(.*\)$", "", name)


def ptxas_rows(log: str) -> dict[str, dict[str, int]]:
    rows, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            current = m.group(1)
            rows[current] = {}
            continue
        if current is None:
            continue
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
            r"(\d+) bytes spill loads",
            line,
        )
        if m:
            rows[current].update(
                stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3))
            )
        m = re.search(r"Used (\d+) registers", line)
        if m:
            rows[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            rows[current]["smem"] = int(s.group(1)) if s else 0
    return rows


def sass_loads(sass: str) -> dict[str, collections.Counter]:
    """Per kernel, the LDG instructions by their width suffix (plain = 32-bit)."""
    loads, current = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            loads[current] = collections.Counter()
            continue
        m = re.search(r"\bLDG\.E((?:\.\w+)*)", line)
        if m and current:
            width = next(
                (w for w in (".128", ".64", ".U16", ".S16", ".U8") if w in m.group(1)), ".32"
            )
            loads[current][width.strip(".")] += 1
    return loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--filter", default="step_kernel")
    parser.add_argument("--sass", type=Path)
    parser.add_argument("--files", default="**/*.cu", help="which .cu files under csrc/cuda/")
    args = parser.parse_args()
    rows, loads = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted((ROOT / "csrc" / "cuda").glob(args.files)):
            cubin = Path(tmp) / (src.stem + ".cubin")
            run = subprocess.run(
                nvcc_command(src, cubin, args.arch), capture_output=True, text=True
            )
            if run.returncode != 0:
                sys.exit(f"nvcc failed on {src.name}:\n{run.stderr[-4000:]}")
            rows.update(ptxas_rows(run.stderr))
            sass = subprocess.run(
                [str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, check=True
            ).stdout
            if args.sass:
                args.sass.mkdir(parents=True, exist_ok=True)
                (args.sass / f"{src.stem}.{args.arch}.sass").write_text(sass)
            loads.update(sass_loads(sass))
    names = demangle(sorted(rows))
    print(f"| kernel ({args.arch}) | regs | spill st/ld | stack | smem | LDG by width |")
    print("|---|---|---|---|---|---|")
    for mangled in sorted(rows, key=lambda n: short(names[n])):
        if args.filter not in names[mangled]:
            continue
        r = rows[mangled]
        widths = " ".join(f"{w}:{n}" for w, n in sorted(loads.get(mangled, {}).items()))
        print(
            f"| {short(names[mangled])} | {r.get('regs')} | {r.get('spill_st')}/"
            f"{r.get('spill_ld')} | {r.get('stack')} | {r.get('smem')} | {widths} |"
        )


if __name__ == "__main__":
    main()

"""What nvcc makes of the CUDA step kernels, read without a GPU, and the CI check on it (issue 33,
item 1): per step kernel of the sm_90 SASS, the dependent global-memory round trips of one step,
the global loads by width, the SHFL and tensor-core (*MMA) instruction counts, registers, spills
and shared memory, and the blocks per SM and waves they give at H768 for B16 and B64 on 132 SMs.

    python benchmarks/cuda_resources.py [--library [PATH] | --files GLOB] [--arch sm_90]
        [--H 768] [--batches 16 64] [--filter step_kernel] [--sass DIR] [--check] [--record]

Where the SASS comes from: --library PATH reads the cubins of a build (without PATH, the library
in fused_lstm/ that has them; built with 9.0 in TORCH_CUDA_ARCH_LIST): cuobjdump, seconds, what
CI and gpu_check.sh run. Without it, every .cu file under csrc/cuda/ (--files) is compiled to a
cubin with the flags setup.py gives nvcc (CUDA_HOME, default /usr/local/cuda), in parallel, which
adds ptxas -v's spill bytes. --sass DIR writes the SASS there.

The trip model (`trips`), an in-order reading of one thread's SASS:
  - a global load is an LDG or LD (generic) instruction; it writes its destination registers
    (one, or the 2 or 4 of a .64 or .128 load) and is pending from its issue;
  - the first later instruction that reads or overwrites a register of a pending load waits for
    it and, in order, for every load issued before it: that ends one dependent round trip and
    retires all pending loads. Loads in flight together share one trip; a load consumed at once
    costs one of its own. An LDGSTS (to shared memory) is pending until the next DEPBAR. An
    unpredicated EXIT drops what is pending;
  - the scan is straight-line in address order: both sides of a branch are read, as if every
    instruction ran once (the kernels' branches are mostly guards on partial tiles and rows);
  - a loop is a backward branch (BRA to a lower address) whose span holds no unpredicated EXIT
    (the warp-divergent SHFL fallbacks nvcc places after the kernel jump back without looping);
    loops inside it are read once per reading of it. Each step kernel has one, over the tiles
    of the reduction. Its body is read twice, the second time with what the first left pending
    (the next tile's weights are loaded at the end of a tile): the second reading is "per tile",
    the first "(first)";
  - per step = trips outside the loop + the first tile's + (tiles - 1) x per tile, tiles =
    ceil(reduction length / Tile::kCols) at H768 (the emulator's tile_columns). "after wait"
    leaves out the trips that end before griddepcontrol.wait, which sm_90 SASS spells ACQBULK
    (griddepcontrol.launch_dependents is PREEXIT).
The targets (issue 33, item 2) and each step kernel's ceiling (its figures when recorded: a
ratchet) are in sass_limits.json, the one table the check and the tests read. --check exits 1
when a kernel spills (ptxas's spill bytes, or any LDL/STL in its SASS: "L" in the table) or a step
kernel exceeds its ceiling; --record rewrites the ceilings from what it reads (lower them as the
kernels improve).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import importlib.util
import json
import math
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
# The targets and the ceilings: the one table the check and the tests read.
LIMITS = Path(__file__).resolve().parent / "sass_limits.json"
# sm_90's limits per SM, and an H100 SXM's SM count.
SM90 = {"regs": 65536, "threads": 2048, "blocks": 32, "smem": 228 << 10, "reserved": 1 << 10}
SMS = 132


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
        # setup.py's too: it changes ptxas's register allocation, so without it the figures differ
        "-lineinfo",
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
    out = subprocess.run(
        ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
    )
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


# ---- the SASS, parsed: one thread's instructions per kernel, in address order ---------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_REG = re.compile(r"\bR(\d+)(\.64)?")
# Instructions whose registers are all 64-bit pairs (double arithmetic) without a .64 suffix.
_PAIR_OPS = {"DADD", "DFMA", "DMUL", "DSETP", "DMNMX"}
GLOBAL_LOADS = {"LDG", "LD"}


@dataclasses.dataclass(frozen=True)
class Instr:
    addr: int
    predicated: bool
    op: str  # with its modifiers: LDG.E.128.CONSTANT
    operands: tuple[str, ...]

    @property
    def base(self) -> str:
        return self.op.split(".")[0]

    @functools.cached_property
    def registers(self) -> frozenset[int]:
        """Every register the instruction reads or writes (both wait on a pending load)."""
        out = set()
        for n, operand in enumerate(self.operands):
            # IMAD.WIDE and its kind write a pair and add one; double arithmetic reads pairs.
            wide = self.base in _PAIR_OPS or (
                ".WIDE" in self.op and n in (0, len(self.operands) - 1)
            )
            for m in _REG.finditer(operand):
                r = int(m.group(1))
                out.update(range(r, r + (2 if m.group(2) or wide else 1)))
        return frozenset(out)

    def load_width(self) -> str:
        """A global load's width: its suffix (128, 64, U16, S16, U8, S8), else 32."""
        mods = self.op.split(".")[1:]
        return next((w for w in ("128", "64", "U16", "S16", "U8", "S8") if w in mods), "32")

    def load_destination(self) -> set[int]:
        first = int(_REG.search(self.operands[0]).group(1))
        return set(range(first, first + {"128": 4, "64": 2}.get(self.load_width(), 1)))


def parse_sass(sass: str) -> dict[str, list[Instr]]:
    """cuobjdump -sass's listing: per (mangled) kernel name, its instructions."""
    kernels, current = {}, None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels[m.group(1)] = []
            continue
        m = _LINE.search(line)
        if m and current is not None:
            operands = tuple(o.strip() for o in m.group(4).split(",") if o.strip())
            current.append(Instr(int(m.group(1), 16), bool(m.group(2)), m.group(3), operands))
    return kernels


# ---- the trip model (the module's docstring) ------------------------------------------------


def _scan(instrs: list[Instr], pending: frozenset[int]) -> tuple[list[int], frozenset[int]]:
    """In-order reading of straight-line code: the addresses where trips end, and what is left
    pending. -1 stands for an LDGSTS in flight."""
    ends, now = [], set(pending)
    for i in instrs:
        if now & i.registers or (i.base == "DEPBAR" and -1 in now):
            ends.append(i.addr)
            now.clear()
        if i.base in GLOBAL_LOADS:
            now |= i.load_destination()
        elif i.base == "LDGSTS":
            now.add(-1)
        elif i.base == "EXIT" and not i.predicated:
            now.clear()
    return ends, frozenset(now)


def loops(instrs: list[Instr]) -> list[tuple[int, int]]:
    """The outermost loops, as (first, last) instruction indices: backward branches whose span
    holds no unpredicated EXIT."""
    index = {i.addr: n for n, i in enumerate(instrs)}
    found = []
    for n, i in enumerate(instrs):
        target = re.fullmatch(r"0x([0-9a-f]+)", i.operands[-1]) if i.operands else None
        if i.base != "BRA" or not target or int(target.group(1), 16) >= i.addr:
            continue
        first = index.get(int(target.group(1), 16))
        if first is not None and not any(
            x.base == "EXIT" and not x.predicated for x in instrs[first:n]
        ):
            found.append((first, n))
    return sorted(
        {a for a in found if not any(b != a and b[0] <= a[0] and a[1] <= b[1] for b in found)}
    )


@dataclasses.dataclass(frozen=True)
class Trips:
    before_wait: int  # ending before griddepcontrol.wait (ACQBULK), outside loops
    outside: int  # the other trips outside loops
    first_tile: int  # the loop body's first reading
    per_tile: int  # its second reading: a tile after the first
    loops: int

    def after_wait(self, tiles: int) -> int:
        if not self.loops:
            return self.outside
        return self.outside + self.first_tile + (tiles - 1) * self.per_tile

    def per_step(self, tiles: int) -> int:
        return self.before_wait + self.after_wait(tiles)


def trips(instrs: list[Instr]) -> Trips:
    """The dependent global-memory round trips of one kernel (the module's docstring); every
    outermost loop is read as the tile loop."""
    wait = next((i.addr for i in instrs if i.base == "ACQBULK"), -1)
    pending, ends, first, steady, n = frozenset(), [], 0, 0, 0
    found = loops(instrs)
    for start, last in found:
        got, pending = _scan(instrs[n:start], pending)
        ends += got
        got1, pending = _scan(instrs[start : last + 1], pending)
        got2, pending = _scan(instrs[start : last + 1], pending)
        first, steady, n = first + len(got1), steady + len(got2), last + 1
    ends += _scan(instrs[n:], pending)[0]
    before = sum(a < wait for a in ends)
    return Trips(before, len(ends) - before, first, steady, len(found))


def over_targets(t: Trips, tiles: int, targets: dict[str, int]) -> list[str]:
    """How a kernel misses issue 33 item 2's targets (sass_limits.json), if it does."""
    got = {"per_tile": t.per_tile if t.loops else 0, "per_step_after_wait": t.after_wait(tiles)}
    return [f"{k} {got[k]} > {targets[k]}" for k in targets if got[k] > targets[k]]


def load_widths(instrs: list[Instr]) -> collections.Counter:
    return collections.Counter(i.load_width() for i in instrs if i.base in GLOBAL_LOADS)


def shfl_count(instrs: list[Instr]) -> int:
    """SHFL instructions outside the warp-divergent fallbacks (WARPSYNC.COLLECTIVE ..
    ENDCOLLECTIVE) nvcc places after the kernel, which repeat them."""
    count, fallback = 0, False
    for i in instrs:
        fallback = (fallback or i.op == "WARPSYNC.COLLECTIVE") and i.base != "ENDCOLLECTIVE"
        count += i.base == "SHFL" and not fallback
    return count


def tensor_core_count(instrs: list[Instr]) -> int:
    """HMMA, HGMMA, IMMA, DMMA and the rest of the *MMA family (HFMA2.MMA is not one)."""
    return sum(i.base.endswith("MMA") for i in instrs)


def local_memory_count(instrs: list[Instr]) -> int:
    """LDL and STL: a spill, or an array ptxas could not keep in registers."""
    return sum(i.base in ("LDL", "STL") for i in instrs)


# ---- occupancy and launch geometry ----------------------------------------------------------


def blocks_per_sm(regs: int, threads: int, smem: int) -> int:
    """Resident blocks per sm_90 SM: registers allocated per warp in units of 256, shared memory
    with 1 KiB reserved per block."""
    per_warp = math.ceil(regs * 32 / 256) * 256
    return min(
        SM90["regs"] // per_warp // math.ceil(threads / 32),
        SM90["threads"] // threads,
        SM90["smem"] // (smem + SM90["reserved"]),
        SM90["blocks"],
    )


def block_threads() -> tuple[int, int]:
    """(kWarps, kThreads) as csrc/cuda/lstm_cuda_thread.h sets them."""
    src = (ROOT / "csrc/cuda/lstm_cuda_thread.h").read_text()
    value = {
        k: int(re.search(rf"constexpr int {k} = (\d+);", src).group(1))
        for k in ("kWarps", "kWarpSize")
    }
    return value["kWarps"], value["kWarps"] * value["kWarpSize"]


DTYPES = {
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "float": torch.float32,
    "double": torch.float64,
}


@dataclasses.dataclass(frozen=True)
class StepKernel:
    backward: bool
    dtype: torch.dtype
    bt: int
    regs_on: bool

    @staticmethod
    def parse(name: str) -> StepKernel | None:
        """From short()'s name: forward_step_kernel<T, acc_t, BT, kRegs>,
        backward_step_kernel<T, acc_t, BT, kFuseUnit, kRegs>."""
        m = re.fullmatch(r"(?:void )?(forward|backward)_step_kernel<(\w+), \w+, (\d+), (.*)>", name)
        if not m:
            return None
        last = m.group(4).split(", ")[-1]
        return StepKernel(
            m.group(1) == "backward", DTYPES[m.group(2)], int(m.group(3)), last == "true"
        )

    def geometry(self, H: int, B: int, emu) -> tuple[int, int, bool]:
        """(blocks, tiles, whether the loop picks this kernel at B) at H without projection.
        Modelled on step_loops.cuh's forward_loop / backward_loop (the one place here that
        does): grid (ceil(H / kWarps), ceil(B / BT)); the batch tile the loop picks and the tile
        width are the emulator's batch_tile and tile_columns, which compile the same code."""
        warps, _ = block_threads()
        blocks = math.ceil(H / warps) * math.ceil(B / self.bt)
        cols = emu.tile_columns(self.dtype, self.bt, self.backward)
        tiles = math.ceil((4 * H if self.backward else H) / cols)
        return blocks, tiles, emu.batch_tile(self.dtype, B, self.backward, self.regs_on) == self.bt


def emulator():
    """fused_lstm._emulated_cuda (FUSED_LSTM_BUILD_EMULATOR=1), or None."""
    try:
        import fused_lstm._emulated_cuda as emu
    except ImportError:
        return None
    return emu


# ---- where the SASS comes from --------------------------------------------------------------


def read_library(library: Path, arch: str) -> tuple[str, dict[str, dict[str, int]]]:
    """The SASS and the resource usage of a build's cubins for arch."""

    def dump(flag: str) -> str:
        return subprocess.run(
            [str(CUOBJDUMP), "-arch", arch, flag, str(library)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    rows, current = {}, None
    for line in dump("--dump-resource-usage").splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)
        if m and current:
            # SHARED counts the 1 KiB sm_90 reserves per block that uses shared memory;
            # the kernel's own is what ptxas -v reports.
            smem = int(m[3])
            rows[current] = {
                "regs": int(m[1]),
                "stack": int(m[2]),
                "smem": max(smem - SM90["reserved"], 0),
            }
    if not rows:
        sys.exit(
            f"no {arch} cubin in {library}: build with {arch[3]}.{arch[4:]} in TORCH_CUDA_ARCH_LIST"
        )
    return dump("-sass"), rows


def find_library(arch: str) -> Path | None:
    """The library of the build (fused_lstm/*.so: this checkout's, else the installed package's)
    that holds arch's cubins."""
    spec = importlib.util.find_spec("fused_lstm")  # finds the package without importing it
    dirs = [
        ROOT / "fused_lstm",
        *[Path(d) for d in (spec and spec.submodule_search_locations) or []],
    ]
    for lib in sorted(lib for d in dirs for lib in d.glob("*.so")):
        listing = subprocess.run(
            [str(CUOBJDUMP), "--list-elf", str(lib)], capture_output=True, text=True, check=False
        ).stdout
        if f".{arch}.cubin" in listing and "_emulated" not in lib.name:
            return lib
    return None


def compile_sass(src: Path, arch: str) -> tuple[str, str]:
    """ptxas -v's log and the SASS of one .cu file, compiled as setup.py compiles csrc/cuda."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / (src.stem + ".cubin")
        run = subprocess.run(
            nvcc_command(src, cubin, arch), capture_output=True, text=True, check=False
        )
        if run.returncode != 0:
            sys.exit(f"nvcc failed on {src.name}:\n{run.stderr[-4000:]}")
        sass = subprocess.run(
            [str(CUOBJDUMP), "-sass", str(cubin)], capture_output=True, text=True, check=True
        ).stdout
    return run.stderr, sass


def compile_sources(files: str, arch: str) -> tuple[str, dict[str, dict[str, int]]]:
    """The SASS and ptxas -v's figures of csrc/cuda's .cu files, compiled in parallel."""
    import concurrent.futures

    srcs = sorted((ROOT / "csrc" / "cuda").glob(files))
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        done = list(pool.map(lambda src: compile_sass(src, arch), srcs))
    rows = {}
    for log, _ in done:
        rows.update(ptxas_rows(log))
    return "".join(sass for _, sass in done), rows


# ---- the report and the check ---------------------------------------------------------------


@dataclasses.dataclass
class KernelRow:
    name: str
    res: dict[str, int]  # regs, smem, stack, and from ptxas spill_st, spill_ld
    instrs: list[Instr]
    kernel: StepKernel | None
    tiles: int | None = None
    blocks_sm: int = 0
    waves: dict[int, float | None] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def trips(self) -> Trips:
        return trips(self.instrs)

    @property
    def spills(self) -> int:
        return local_memory_count(self.instrs) + self.res.get("spill_st", 0)

    def figures(self) -> dict[str, int]:
        t = self.trips
        return {"per_tile": t.per_tile, "per_step_after_wait": t.after_wait(self.tiles or 1)}


def measure(sass: str, res: dict, name_filter: str, H: int, batches: list[int]) -> list[KernelRow]:
    kernels = parse_sass(sass)
    names = demangle(sorted(kernels))
    emu = emulator()
    _, threads = block_threads()
    out = []
    for mangled, instrs in kernels.items():
        name = short(names[mangled]).removeprefix("void ")
        if name_filter not in name:
            continue
        row = KernelRow(name, res.get(mangled, {}), instrs, StepKernel.parse(name))
        row.blocks_sm = blocks_per_sm(row.res.get("regs", 0), threads, row.res.get("smem", 0))
        if row.kernel and emu:
            for B in batches:
                blocks, row.tiles, picked = row.kernel.geometry(H, B, emu)
                row.waves[B] = blocks / (row.blocks_sm * SMS) if picked else None
        out.append(row)
    return sorted(out, key=lambda r: r.name)


def problems(rows: list[KernelRow], limits: dict) -> list[str]:
    """What fails CI: a spill; a step kernel over its ceiling, without one, or with more loops
    than the tile loop (the per-step figure would not mean what the docstring says)."""
    out = []
    for r in rows:
        if r.spills:
            out.append(f"{r.name}: spills ({r.spills} local-memory instructions or bytes)")
        if r.kernel is None:
            continue
        if r.trips.loops > 1:
            out.append(f"{r.name}: {r.trips.loops} loops, where the model reads one tile loop")
        ceiling = limits["ceilings"].get(r.name)
        if ceiling is None:
            out.append(f"{r.name}: no ceiling in {LIMITS.name} (--record)")
            continue
        got = r.figures()
        out += [
            f"{r.name}: {k} {got[k]} > ceiling {ceiling[k]}" for k in got if got[k] > ceiling[k]
        ]
    return out


def table(rows: list[KernelRow], limits: dict, arch: str, H: int, batches: list[int]) -> str:
    head = ["regs", "spill", "smem", "LDG by width", "SHFL", "MMA", "trips/tile (first)"]
    head += [f"tiles H{H}", "trips/step (after wait)", "ceiling tile/step", "blocks/SM"]
    head += [f"waves B{B}" for B in batches]
    lines = [f"| kernel ({arch}) | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for r in rows:
        t = r.trips
        spill = f"{r.res['spill_st']}/{r.res['spill_ld']}" if "spill_st" in r.res else ""
        spill += f" L{local_memory_count(r.instrs)}"
        widths = " ".join(f"{w}:{n}" for w, n in sorted(load_widths(r.instrs).items()))
        tiles = r.tiles or 1
        c = limits["ceilings"].get(r.name)
        ceiling = f"{c['per_tile']}/{c['per_step_after_wait']}" if c else "-"
        wv = " | ".join("-" if r.waves.get(B) is None else f"{r.waves[B]:.2f}" for B in batches)
        lines.append(
            f"| {r.name} | {r.res.get('regs')} | {spill.strip()} | {r.res.get('smem')} | "
            f"{widths} | {shfl_count(r.instrs)} | {tensor_core_count(r.instrs)} | "
            f"{t.per_tile} ({t.first_tile}) | {r.tiles or '?'} | {t.per_step(tiles)} "
            f"({t.after_wait(tiles)}) | {ceiling} | {r.blocks_sm} | {wv} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--library",
        type=Path,
        nargs="?",
        const="auto",
        help="read this build's cubins instead of compiling (no PATH: the one in fused_lstm/)",
    )
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--filter", default="step_kernel")
    parser.add_argument("--sass", type=Path, help="also write the SASS into this folder")
    parser.add_argument("--files", default="**/*.cu", help="which .cu files under csrc/cuda/")
    parser.add_argument("--H", type=int, default=768)
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--check", action="store_true", help="exit 1 on a spill or a ceiling")
    parser.add_argument("--record", action="store_true", help="write today's figures as ceilings")
    args = parser.parse_args()
    if args.library:
        library = find_library(args.arch) if str(args.library) == "auto" else args.library
        if library is None:
            sys.exit(f"no library with {args.arch} cubins in {ROOT / 'fused_lstm'}")
        sass, res = read_library(library, args.arch)
    else:
        sass, res = compile_sources(args.files, args.arch)
    if args.sass:
        args.sass.mkdir(parents=True, exist_ok=True)
        (args.sass / f"{args.arch}.sass").write_text(sass)
    limits = json.loads(LIMITS.read_text())
    rows = measure(sass, res, args.filter, args.H, args.batches)
    if any(r.kernel for r in rows) and emulator() is None:
        sys.exit("the tile counts need fused_lstm._emulated_cuda (FUSED_LSTM_BUILD_EMULATOR=1)")
    if args.record:
        ceilings = (
            f"    {json.dumps(r.name)}: {json.dumps(r.figures())}" for r in rows if r.kernel
        )
        head = json.dumps({k: v for k, v in limits.items() if k != "ceilings"}, indent=2)
        LIMITS.write_text(head[:-2] + ',\n  "ceilings": {\n' + ",\n".join(ceilings) + "\n  }\n}\n")
    print(table(rows, limits, args.arch, args.H, args.batches))
    targets = limits["targets"]
    missing = [
        f"{r.name}: {', '.join(m)}"
        for r in rows
        if r.kernel and (m := over_targets(r.trips, r.tiles or 1, targets))
    ]
    print(
        f"\ntargets (issue 33 item 2): at most {targets['per_tile']} trips per tile, "
        f"{targets['per_step_after_wait']} per step after the wait; "
        f"{len(missing)} of {sum(1 for r in rows if r.kernel)} step kernels miss them"
    )
    print("\n".join(missing))
    lower = [
        r.name
        for r in rows
        if r.name in limits["ceilings"]
        and any(v < limits["ceilings"][r.name][k] for k, v in r.figures().items())
    ]
    if lower:
        print(f"\nbelow their ceilings (lower them with --record): {', '.join(lower)}")
    if args.check:
        failed = problems(rows, limits)
        print(
            "\ncheck: "
            + ("\n".join(failed) if failed else "every kernel within its ceiling, no spills")
        )
        sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

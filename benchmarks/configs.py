"""Benchmark configurations (docs/benchmarks.md, "Configurations"). B=None means unbatched
input; cell=True times nn.LSTMCell against FusedLSTMCell stepped over the T steps in a Python
loop."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    name: str
    T: int
    B: int | None
    I: int
    H: int
    layers: int = 1
    dtypes: tuple[str, ...] = ("float32",)
    cell: bool = False


CPU_DTYPES = ("float32", "bfloat16")
CPU = [
    Config("seed-tiny", 2000, None, 4, 20),
    Config("seed-chars", 799, None, 5, 4),
    # bfloat16 too where nn.LSTM runs it in oneDNN's RNN (issue 34 measured medium and mid-B16 at
    # half its speed); the seeds' sizes are float32 programs.
    Config("small-batch", 200, 8, 64, 64, 2, dtypes=CPU_DTYPES),
    Config("medium", 100, 64, 256, 256, dtypes=CPU_DTYPES),
    Config("wide-B1", 200, 1, 512, 512, dtypes=CPU_DTYPES),
    # between the named sizes, where "nothing below 1.0x" must hold too: a narrow unbatched
    # layer between the seeds and wide-B1, a batch between small-batch and medium
    Config("mid-B1", 500, 1, 32, 32),
    Config("mid-B16", 100, 16, 128, 128, dtypes=CPU_DTYPES),
    # seed 001's loop of FusedLSTMCell steps, where per-step overhead is all there is to time
    Config("cell-B1", 200, 1, 4, 20, cell=True),
    Config("cell-B8", 200, 8, 4, 20, cell=True),
]

# fp16 can give cuDNN its persistent kernel, bf16 never does: docs/benchmarks.md asks for both.
HALVES = ("float16", "bfloat16")
GPU = [
    Config("fastrnns", 100, 64, 512, 512, dtypes=("float32", "bfloat16")),
    Config("fastrnns-4L", 100, 64, 512, 512, 4),
    Config("flashrnn", 1024, 16, 768, 768, dtypes=HALVES),
    # DeepBench's inference latency case: T 50, I = H = 1024, batches of 1 to 8
    Config("gpu-small-batch-B1", 50, 1, 1024, 1024, dtypes=HALVES),
    Config("gpu-small-batch-B4", 50, 4, 1024, 1024, dtypes=HALVES),
    Config("gpu-small-batch-B8", 50, 8, 1024, 1024, dtypes=HALVES),
]

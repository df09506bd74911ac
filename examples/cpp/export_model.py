"""Saves what examples/cpp/deploy.cpp loads, into a folder: a model holding a 2-layer FusedLSTM
with proj_size and a FusedLSTMCell, as TorchScript (model.ts) and as an AOTInductor package
(model.pt2, and model_cuda.pt2 where a GPU runs the CUDA kernels); its input (inputs.pt); and
what Python computes with it (expected.pt), the outputs and, for one training step, the loss,
the gradients and the loss after an SGD step, for the C++ program's results to be held against.

    python examples/cpp/export_model.py DIR [--dtype float32|float64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

import fused_lstm

LR = 0.01  # the SGD step's, in inputs.pt for deploy.cpp


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = fused_lstm.FusedLSTM(5, 8, num_layers=2, proj_size=3)
        self.cell = fused_lstm.FusedLSTMCell(3, 6)

    def forward(self, x: torch.Tensor):
        y, (h, c) = self.lstm(x)
        hc, cc = self.cell(y[-1])
        return y, h, c, hc, cc


def loss_of(outputs) -> torch.Tensor:
    return sum((t * t).sum() for t in outputs)


def expected(model: Model, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """deploy.cpp's computation, in Python."""
    with torch.no_grad():
        outputs = model(x)
    results = {f"out{k}": t for k, t in enumerate(outputs)}
    loss = loss_of(model(x))
    loss.backward()
    results["loss"] = loss.detach()
    with torch.no_grad():
        for name, p in model.named_parameters():
            results[f"grad.{name}"] = p.grad.clone()
            p -= LR * p.grad
        results["loss_after_step"] = loss_of(model(x))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)
    model = Model().to(dtype)
    x = torch.randn(7, 2, 5, dtype=dtype)
    torch.save({"x": x, "lr": torch.tensor(LR, dtype=torch.float64)}, args.dir / "inputs.pt")
    torch.jit.script(model).save(str(args.dir / "model.ts"))
    devices = ["cpu"] + (["cuda"] if "cuda" in fused_lstm.native_backends() else [])
    for device in devices:
        on_device = Model().to(dtype).to(device)
        on_device.load_state_dict(model.state_dict())
        exported = torch.export.export(on_device.eval(), (x.to(device),))
        name = "model.pt2" if device == "cpu" else f"model_{device}.pt2"
        torch._inductor.aoti_compile_and_package(exported, package_path=str(args.dir / name))
    torch.save(expected(model, x), args.dir / "expected.pt")
    print(
        f"saved {args.dtype} model.ts, {', '.join(devices)} .pt2, inputs and expected to {args.dir}"
    )


if __name__ == "__main__":
    main()

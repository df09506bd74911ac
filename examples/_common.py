"""Pieces the example programs share: the lectures' one-hot text data, their training loop and
the command line every example takes (``--quick`` for the tests, ``--steps``, ``--every``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

import torch


def text_data(pattern: str, repeat: int = 100) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Seed 003's data: ``txt = list(pattern) * repeat``, x = one-hot of ``txt[:-1]``, y = one-hot
    of ``txt[1:]`` (the next character), and the characters in their one-hot order."""
    # Order of first appearance reproduces the lectures' mappings ({'a':0,'b':1,'c':2,'C':3}, ...).
    chars = list(dict.fromkeys(pattern))
    mapping = {ch: k for k, ch in enumerate(chars)}
    idx = torch.tensor([mapping[ch] for ch in list(pattern) * repeat])
    one_hot = torch.nn.functional.one_hot(idx, len(chars)).float()
    return one_hot[:-1], one_hot[1:], chars


def water(rnn: torch.nn.Module) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The lectures' ``_water``: the all-zero initial state of an unbatched one-layer RNN, or the
    (h, c) pair of them that an LSTM (FusedLSTM included) takes."""
    zeros = torch.zeros(1, rnn.hidden_size)
    return zeros if isinstance(rnn, torch.nn.RNN) else (zeros, zeros)


def train(
    params: Iterable[torch.nn.Parameter],
    compute_loss: Callable[[], torch.Tensor],
    *,
    steps: int,
    lr: float,
    every: int = 0,
    label: str = "",
    max_grad_norm: float | None = None,
) -> list[float]:
    """The lectures' loop: full-batch Adam, one step per epoch; returns every step's loss.

    ``compute_loss`` runs the forward pass and returns the loss. With ``every``, the loss is
    printed in seed 001's format every ``every`` steps and after the last one. With
    ``max_grad_norm``, the gradients are clipped to that norm before each step.
    """
    params = list(params)
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for step in range(steps):
        loss = compute_loss()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if every and ((step + 1) % every == 0 or step == 0 or step + 1 == steps):
            print(f"{label}Epoch [{step + 1}/{steps}], Loss: {losses[-1]:.4g}")
    return losses


def parse_args(
    argv: list[str] | None,
    doc: str,
    *,
    steps: int,
    quick_steps: int,
    prints: int = 10,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Parse an example's command line: ``--quick`` trains ``quick_steps`` steps instead of
    ``steps`` (what the tests run), ``--steps`` overrides both, ``--every`` sets how often the loss
    is printed (``prints`` times by default). ``add_arguments`` adds the example's own options."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"train {quick_steps} steps instead of {steps} (the tests' run)",
    )
    parser.add_argument("--steps", type=int, help="training steps (full-batch epochs)")
    parser.add_argument("--every", type=int, help="print the loss every this many steps")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = quick_steps if args.quick else steps
    if args.every is None:
        args.every = max(1, args.steps // prints)
    return args

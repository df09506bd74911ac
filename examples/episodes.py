"""Episodes back to back, as a reinforcement-learning rollout holds them, with FusedLSTM's reset.

A rollout of T steps in each of B environments holds several episodes one after another; the
policy's LSTM must start every episode from zero state. The observation does not say where an
episode begins (in RL the `done` signal is the environment's, not part of what the agent sees),
so the model is told with ``reset``, a bool (T, B) tensor that is True at every episode's first
step, as Stable-Baselines3's RecurrentPPO passes ``episode_starts``.

The task: at each step the observation is a bit (1 with probability 0.08); the target is whether
a 1 has been seen yet in this episode. With reset, the LSTM learns a latch. Without it, the
latch is never cleared, and from the moment a row has seen a 1 the model has no way to know
that a new episode began: it stays wrong until it learns to forget by guesswork.

Trains the same model twice from the same start, with reset and without, and prints each one's
accuracy on fresh rollouts. Then checks that FusedLSTM with reset is the Python step loop
RecurrentPPO runs without it (nn.LSTM one step at a time, its state multiplied by
``1 - episode_start``), and times a training step of each.

    python examples/episodes.py [--quick] [--steps 150] [--every 15]
"""

import time

import torch
from torch import nn

from fused_lstm import FusedLSTM

from _common import parse_args, train

T, B, HIDDEN = 300, 16, 16


def rollout(generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observations (T, B, 1), episode starts (T, B) and targets (T, B) of one rollout."""
    bits = (torch.rand(T, B, generator=generator) < 0.08).float()
    reset = torch.rand(T, B, generator=generator) < 1 / 30  # episodes 30 steps long on average
    reset[0] = True
    seen = torch.zeros(B)
    target = torch.empty(T, B)
    for t in range(T):
        seen = torch.where(reset[t], 0.0, seen)
        seen = torch.maximum(seen, bits[t])
        target[t] = seen
    return bits.unsqueeze(-1), reset, target


class Policy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = FusedLSTM(1, HIDDEN)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, obs, reset=None):
        out, _ = self.lstm(obs, reset=reset)
        return self.head(out).squeeze(-1)


def step_loop(policy: Policy, obs: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """RecurrentPPO's way without a fused reset: nn.LSTM one step at a time, the state zeroed by
    multiplying it with 1 - episode_start."""
    lstm = nn.LSTM(1, HIDDEN)
    lstm.load_state_dict(policy.lstm.state_dict())
    h = c = torch.zeros(1, B, HIDDEN)
    outs = []
    for t in range(T):
        keep = (~reset[t]).float().view(1, B, 1)
        out, (h, c) = lstm(obs[t : t + 1], (h * keep, c * keep))
        outs.append(out)
    return policy.head(torch.cat(outs)).squeeze(-1)


def accuracy(policy: Policy, with_reset: bool, generator: torch.Generator) -> float:
    obs, reset, target = rollout(generator)
    with torch.no_grad():
        logits = policy(obs, reset if with_reset else None)
    return ((logits > 0).float() == target).float().mean().item()


def time_training_step(forward, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward().sum().backward()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> dict:
    """Returns the accuracies with and without reset, the largest difference between FusedLSTM
    with reset and the step loop, and a training step's time in each."""
    args = parse_args(argv, __doc__, steps=150, quick_steps=40)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = Policy().state_dict()
    data = torch.Generator().manual_seed(1)
    loss_fn = nn.BCEWithLogitsLoss()
    result = {}
    for with_reset in (True, False):
        policy = Policy()
        policy.load_state_dict(start)

        def loss():
            obs, reset, target = rollout(data)  # a fresh rollout every step
            return loss_fn(policy(obs, reset if with_reset else None), target)

        label = "with reset:    " if with_reset else "without reset: "
        # Clipped, as RecurrentPPO clips (max_grad_norm): once the loss is near zero, an
        # unclipped Adam step could throw the latch away (seen at step 150 of one seed in five).
        losses = train(
            policy.parameters(),
            loss,
            steps=args.steps,
            lr=0.02,
            every=args.every,
            label=label,
            max_grad_norm=1.0,
        )
        test = torch.Generator().manual_seed(2)
        acc = accuracy(policy, with_reset, test)
        print(f"{label}accuracy on fresh rollouts {acc:.3f}")
        result["with_reset" if with_reset else "without_reset"] = {
            "losses": losses,
            "accuracy": acc,
        }
        if with_reset:
            trained = policy

    obs, reset, _ = rollout(torch.Generator().manual_seed(3))
    fused = trained(obs, reset)
    loop = step_loop(trained, obs, reset)
    result["loop_difference"] = (fused - loop).abs().max().item()
    result["seconds"] = {
        "FusedLSTM(reset=...)": time_training_step(lambda: trained(obs, reset)),
        "step loop": time_training_step(lambda: step_loop(trained, obs, reset)),
    }
    print(
        f"FusedLSTM with reset vs the step loop: largest difference {result['loop_difference']:.2e}"
    )
    for name, seconds in result["seconds"].items():
        print(f"training step, {name}: {seconds * 1e3:.1f} ms")
    return result


if __name__ == "__main__":
    main()

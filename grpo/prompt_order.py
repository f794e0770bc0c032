"""Which prompts each step trains on: one seeded order per epoch, cut into a share per rank, and
--dynamic_sampling's further draws. A resumed run draws exactly what the uninterrupted run would."""

from __future__ import annotations

import torch


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def step_prompts(step: int, n: int, per_step: int, seed: int, rank: int = 0,
                 world_size: int = 1) -> tuple[list[int], float]:
    """This rank's dataset indices of step `step` (0-based) and the epoch the step reaches: one seeded
    global order per epoch (a step may run across the boundary into the next epoch's order), each
    step's prompts cut into world_size contiguous shards."""
    start = step * per_step
    orders: dict[int, list[int]] = {}
    indices = []
    for k in range(start, start + per_step):
        epoch = k // n
        if epoch not in orders:
            orders[epoch] = _epoch_order(n, seed, epoch)
        indices.append(orders[epoch][k % n])
    share = per_step // world_size
    return indices[rank * share: (rank + 1) * share], (start + per_step) / n


def extra_prompts(step: int, attempt: int, n: int, per_step: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """This rank's indices for --dynamic_sampling's further rollout `attempt` (1, 2, ...) of step `step`:
    a seeded draw of its own (the same on every rank, then sharded), so a resumed run draws the same
    and the epoch order is left as it is."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 101 + attempt) % 2**63)
    indices = torch.randint(n, (per_step,), generator=g).tolist()
    share = per_step // world_size
    return indices[rank * share: (rank + 1) * share]

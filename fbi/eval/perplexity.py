"""Perplexity on the held-out split, for the student and the teacher alike."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.distributed as dist

from fbi.data.shards import TokenShards
from fbi.distill.loss import mean_token_nll


@torch.no_grad()
def perplexity(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    data: TokenShards,
    batches: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    should_stop: Callable[[], bool] | None = None,
) -> float | None:
    """exp(mean next-token NLL) over the first ``batches * batch_size`` samples, in order.

    ``should_stop`` is asked after every round (on every rank, so it may be a collective such
    as an agreed preemption flag); when it says so, evaluation ends early and returns None.

    Batch ``j`` goes to rank ``j % world_size``. Every rank runs the same number of forward
    passes, because ZeRO-3 gathers parameters collectively; a rank with no batch left runs
    a spare one and discards it. Sums are all-reduced, so every rank returns the same value.
    """
    n = min(data.num_samples, batches * batch_size)
    starts = list(range(0, n, batch_size))
    rounds = math.ceil(len(starts) / world_size)
    nll_and_count = torch.zeros(2, dtype=torch.float64, device=device)
    for r in range(rounds):
        j = r * world_size + rank
        real = j < len(starts)
        start = starts[j] if real else 0
        batch = torch.from_numpy(data.batch(range(start, min(start + batch_size, n)))).to(device)
        mean_nll, tokens = mean_token_nll(logits_fn(batch[:, :-1]), batch[:, 1:])
        if real:
            nll_and_count += torch.stack([mean_nll.double() * tokens, tokens.double()])
        if should_stop is not None and should_stop():
            return None
    if world_size > 1:
        dist.all_reduce(nll_and_count)
    return math.exp((nll_and_count[0] / nll_and_count[1]).item())

"""Log-probabilities of continuations: what BLiMP and the lm-eval adapter both ask a model."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from fbi.progress import Progress


@torch.no_grad()
def continuation_logprobs(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    sequences: Sequence[Sequence[int]],
    n_scored: Sequence[int],
    batch_size: int,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    progress: Progress | None = None,
) -> tuple[list[float], list[bool]]:
    """For each token sequence, the summed log-probability of its last ``n_scored`` tokens
    given everything before them, and whether each of them was the argmax (greedy).

    Sequences are right-padded into batches (causal attention: padding after a sequence
    cannot change it). Batch ``j`` goes to rank ``j % world_size`` and every rank runs the
    same number of forward passes (ZeRO-3 gathers collectively); results are all-reduced.
    """
    n = len(sequences)
    if any(k < 1 or k >= len(s) for s, k in zip(sequences, n_scored)):
        raise ValueError("every sequence needs a prefix of at least one token before its scored part")
    starts = list(range(0, n, batch_size))
    rounds = math.ceil(len(starts) / world_size)
    out = torch.zeros(2, n, dtype=torch.float64, device=device)  # logprob sum, all greedy
    for r in range(rounds):
        j = r * world_size + rank
        real = j < len(starts)
        rows = range(starts[j], min(starts[j] + batch_size, n)) if real else range(min(1, n))
        width = max(len(sequences[i]) for i in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for b, i in enumerate(rows):
            batch[b, : len(sequences[i])] = torch.tensor(sequences[i])
        logprobs = torch.log_softmax(logits_fn(batch[:, :-1].to(device)).double(), dim=-1)
        if progress is not None:
            progress.update()
        if not real:
            continue
        for b, i in enumerate(rows):
            length, k = len(sequences[i]), n_scored[i]
            pred = logprobs[b, length - 1 - k: length - 1]
            target = batch[b, length - k: length].to(device)
            out[0, i] = pred.gather(-1, target[:, None]).sum()
            out[1, i] = float(bool((pred.argmax(-1) == target).all()))
    if world_size > 1:
        dist.all_reduce(out)
    return out[0].tolist(), [bool(g) for g in out[1].tolist()]

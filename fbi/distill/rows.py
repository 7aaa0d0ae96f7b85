"""How a position's targets are stored in the cache, read back, and checked when read.

Top-k values (``teacher.cache.value_dtype``):

- float32 / float16 / bfloat16: the k log-probabilities and the log of the tail mass.
- uint8: the k probabilities and the tail in integer units of 1/255 that sum to 255 exactly
  (the tail is not stored: it is 255 minus the rest). Rounding is unbiased: one uniform
  u per position, unit j = floor(C_j + u) - floor(C_{j-1} + u) with C the running sum of
  255 * p (systematic rounding), so E[unit_j] = 255 * p_j, every unit is 255 * p_j rounded
  down or up, and the sum is 255. The loss is linear in the target weights, so the loss and
  its gradient stay unbiased; the error per weight is below 1/255.

Sampled counts are integers (uint8 up to 255 draws) and need no rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

UNITS = 255  # uint8 top-k: the probability of one position, in units


def encode_values(x: torch.Tensor, value_dtype: str) -> np.ndarray:
    """Float log-probabilities as stored (numpy has no bfloat16: its bits go as uint16)."""
    if value_dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(getattr(torch, value_dtype)).numpy()


def decode_values(a: np.ndarray, value_dtype: str) -> torch.Tensor:
    if value_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a.astype(np.float32))


def encode_units(logp: torch.Tensor, log_tail: torch.Tensor,
                 generator: torch.Generator) -> torch.Tensor:
    """(..., k) top-k log-probs and (...) log tail -> (..., k) uint8 units (systematic
    rounding: unbiased, summing with the implied tail to exactly UNITS)."""
    p = torch.cat([logp.double().exp(), log_tail.double().exp().unsqueeze(-1)], -1)
    cum = UNITS * p.cumsum(-1) / p.sum(-1, keepdim=True)
    cum[..., -1] = UNITS  # exactly: the rounding of the sum must not lose a unit
    u = torch.rand(cum.shape[:-1] + (1,), generator=generator, dtype=torch.float64,
                   device=cum.device)
    edges = torch.cat([torch.zeros_like(u), torch.floor(cum + u)], -1)
    return edges.diff(dim=-1)[..., :-1].to(torch.uint8)


def decode_units(units: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., k) uint8 units -> (weights (..., k), tail (...)) as probabilities."""
    u = torch.from_numpy(units.astype(np.float32))
    return u / UNITS, (UNITS - u.sum(-1)) / UNITS


def sum_tolerance(value_dtype: str, slots: int) -> float:
    """How far from 1 the stored k + 1 probabilities of a good top-k row may sum.

    A stored log-prob x is off by up to |x| * eps / 2, so p = e^x by p |x| eps / 2 <=
    eps / (2e) (p |log p| <= 1/e); k + 1 of them add up, plus fp32 rounding of the sum."""
    if value_dtype == "uint8":
        return 0.0
    eps = torch.finfo(getattr(torch, value_dtype)).eps
    return (slots + 1) * eps / (2 * math.e) + 1e-5


def bad_rows(ids: np.ndarray, weights: torch.Tensor, tail: torch.Tensor | None,
             vocab_size: int, tolerance: float) -> list[tuple[tuple[int, ...], str]]:
    """Positions of (..., K) targets that cannot be a teacher's, with what is wrong: an id
    outside the vocabulary, an id listed twice (a row never written is all zeros), weights
    that do not sum to one with the tail (sampled: tail None, counts as weights), a NaN.
    Rows that pass may still be damaged in ways no rule sees (ids zeroed under a confident
    count, ids and values from different writes): the row checksum (cache_files.py) sees those."""
    found = []
    ids_t = torch.from_numpy(ids.astype(np.int64))
    out = (ids_t >= vocab_size).any(-1)
    used = weights > 0 if tail is None else torch.ones_like(weights, dtype=torch.bool)
    # Ids in use, sorted; unused slots (sampled, count 0) get distinct negative ids.
    keyed = torch.where(used, ids_t, -1 - torch.arange(ids.shape[-1]))
    ordered = keyed.sort(-1).values
    twice = (ordered[..., 1:] == ordered[..., :-1]).any(-1)
    total = weights.sum(-1) + (0 if tail is None else tail)
    nan = total.isnan()  # a NaN fails no comparison: the sum test alone would pass it
    off = (total - 1).abs() > tolerance
    for mask, what in ((nan, "a NaN probability"),
                       (out, f"a token id >= the vocabulary size {vocab_size}"),
                       (twice, "a token id listed twice (an unwritten row reads as zeros)"),
                       (off, "target probabilities that do not sum to one")):
        for index in mask.nonzero().tolist()[:1]:
            found.append((tuple(index), what))
    return found

"""What a teacher source hands the loss: dense logits, or sparse targets.

Dense targets are the teacher's (B, S, V) logits, a plain tensor. Sparse targets keep, per
position, a few token ids with the target probability the loss should put on each, and what
the loss needs about the mass that is not listed:

- top-k (``tail`` given): the teacher's own probabilities of its k most likely tokens, and
  the probability of all other tokens together. The loss treats "any other token" as one
  class, so it compares K + 1 probabilities: the student's mass outside the k ids is pulled
  toward the teacher's (it is not renormalized away, which would make the student
  overconfident on the listed tokens).
- top-k with the label tail (``label_tail``, ``teacher.cache.tail=label``): where the true
  next token is outside the k ids, the tail mass goes to it, so the student's tail is shaped
  by the data instead of only its total; where it is listed, the tail stays one class.
- sampled (``tail`` None): tokens drawn from the teacher's distribution, each weighted by its
  count / draws (Anshumann et al., ACL 2025, "Sparse Logit Sampling"). The weights sum to 1
  and are an unbiased estimate of the teacher's distribution, so the loss and its gradient
  are unbiased estimates of the full-vocabulary ones. Unused slots have weight 0.
"""

from __future__ import annotations

from typing import NamedTuple, Union

import torch
from torch import Tensor


class SparseTargets(NamedTuple):
    """ids: (B, S, K) integer token ids; weights: (B, S, K) float target probabilities
    (already at the distillation temperature); tail: (B, S) float mass outside ``ids``
    (top-k) or None (sampled: the weights alone are the target). ``label_slot``: the last
    slot is the label tail's (``label_tail``), so ``soft_ce`` can read the teacher's top-k
    apart from where the loss put its tail."""

    ids: Tensor
    weights: Tensor
    tail: Tensor | None
    label_slot: bool = False

    def to(self, device) -> "SparseTargets":
        tail = None if self.tail is None else self.tail.to(device)
        return SparseTargets(self.ids.to(device), self.weights.to(device), tail, self.label_slot)


Targets = Union[Tensor, SparseTargets]  # a Tensor is the teacher's dense (B, S, V) logits


def label_tail(t: SparseTargets, labels: Tensor) -> SparseTargets:
    """Top-k targets with one more slot: the (B, S) next-token ``labels``, weighted by the
    tail mass where the label is not among the ids (then no tail is left), by 0 where it is
    (the tail stays one class; the loss counts an id listed twice once)."""
    labels = labels.to(t.ids.device).unsqueeze(-1)
    listed = (t.ids == labels).any(-1)
    ids = torch.cat([t.ids, labels.to(t.ids.dtype)], -1)
    weights = torch.cat([t.weights, torch.where(listed, 0.0, t.tail).unsqueeze(-1)], -1)
    return SparseTargets(ids, weights, torch.where(listed, t.tail, 0.0), label_slot=True)
